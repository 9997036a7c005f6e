# The README's two commands: `make demo` (main job) and `make test`. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.prismrt-installed
OUT    ?= out/demo
SAMPLE := Testing/Data/openkbp_pt_226
SARCOMA := Testing/Data/sts_002

.PHONY: env demo test clean-env

env: $(STAMP)

# Re-installs only when the dependency declarations change.
$(STAMP): pyproject.toml PRISMRTLib/requirements.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -qq -c constraints.txt -e '.[report,test,slicer-test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/prismrt info $(SAMPLE)/ct.nii.gz
	$(BIN)/prismrt overview $(SAMPLE)/ct.nii.gz --window head-and-neck \
	    --overlay $(SAMPLE)/PTV70.nii.gz --overlay $(SAMPLE)/LeftParotid.nii.gz \
	    --overlay $(SAMPLE)/RightParotid.nii.gz --overlay $(SAMPLE)/SpinalCord.nii.gz \
	    --out $(OUT) --overwrite
	# one click in a soft-tissue sarcoma (the GTV's deepest point) at clinical resolution, propagated into 3D with the
	# default model (no backend flag: LiteMedSAM fine-tuned for clicks), drawn against the clinician's GTV
	$(BIN)/prismrt segment $(SARCOMA)/ct.nii.gz --point 83.98,128.91,-550.56 --propagate \
	    --out $(OUT)/sarcoma_one_click.nii.gz --overwrite
	$(BIN)/prismrt overview $(SARCOMA)/ct.nii.gz --window soft-tissue --point 83.98,128.91,-550.56 \
	    --overlay $(SARCOMA)/GTV.nii.gz --overlay $(OUT)/sarcoma_one_click.nii.gz --out $(OUT)/sarcoma --overwrite
	# the head-and-neck CT with the shipped stand-in teachers: three clicks on PTV70's central slice, propagated
	$(BIN)/prismrt segment $(SAMPLE)/ct.nii.gz --point 246.1,222.6,-160.0 --point 273.4,242.2,-160.0 \
	    --point 218.7,238.3,-160.0 --propagate --backend teachers --model teachers-standin-openkbp \
	    --out $(OUT)/ptv70_three_clicks.nii.gz --overwrite
	$(BIN)/prismrt overview $(SAMPLE)/ct.nii.gz --window head-and-neck --point 246.1,222.6,-160.0 \
	    --overlay $(SAMPLE)/PTV70.nii.gz --overlay $(OUT)/ptv70_three_clicks.nii.gz \
	    --out $(OUT)/segmentation --overwrite

test: $(STAMP)
	$(BIN)/python -m pytest

clean-env:
	rm -rf $(VENV)
