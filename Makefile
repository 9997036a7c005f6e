# The README's two commands: `make demo` (main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prismrt-installed
OUT    ?= out/demo
SAMPLE := Testing/Data/openkbp_pt_226

.PHONY: env demo test clean-env

env: $(STAMP)

# Re-installs only when the dependency declarations change.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -qq -c constraints.txt -e '.[report,test,slicer-test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prismrt info $(SAMPLE)/ct.nii.gz
	$(BIN)/prismrt overview $(SAMPLE)/ct.nii.gz --window head-and-neck \
	    --overlay $(SAMPLE)/PTV70.nii.gz --overlay $(SAMPLE)/LeftParotid.nii.gz \
	    --overlay $(SAMPLE)/RightParotid.nii.gz --overlay $(SAMPLE)/SpinalCord.nii.gz \
	    --out $(OUT) --overwrite
	# one click inside the target (PTV70's most interior point), propagated into 3D with the shipped stand-in teachers
	$(BIN)/prismrt segment $(SAMPLE)/ct.nii.gz --point 246.1,222.6,-160.0 --propagate --backend teachers \
	    --out $(OUT)/ptv70_one_click.nii.gz --overwrite
	$(BIN)/prismrt overview $(SAMPLE)/ct.nii.gz --window head-and-neck --point 246.1,222.6,-160.0 \
	    --overlay $(SAMPLE)/PTV70.nii.gz --overlay $(OUT)/ptv70_one_click.nii.gz \
	    --out $(OUT)/segmentation --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

clean-env:
	rm -rf $(VENV)
