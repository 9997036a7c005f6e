"""A chat about one image: the question is parsed into intents (:mod:`.parser`), each intent goes to the engine that
can answer it exactly (header and geometry, then the loaded structures), and only what the data cannot settle goes
to the image model; what nobody can answer gets "I cannot tell from this CT because ...".

    session = ChatSession(ct, StructureSet.from_files(paths, ct))
    session.ask("how far is the cord from PTV70?").to_dict()
    session.ask("is the left parotid in this slice?", slice="axial:63")

The image model is built on first use (``image_model="auto"``: the default backend, CLIP role), so questions the
header and structures answer never load torch.
"""

from __future__ import annotations

from typing import Callable

import SimpleITK as sitk

from ..errors import PrismRTError
from . import parser as question_parser
from .engines import header as header_engine
from .engines import structures as structure_engine
from .types import ANSWERED, CANNOT_TELL, CLARIFY, HEADER_KINDS, Answer, ChatContext, ChatError, SliceRef

# below this parser probability the chat asks which reading was meant instead of answering
CLARIFY_BELOW = 0.55
# kinds the image model can answer from pixels alone (no structures loaded)
IMAGE_KINDS = ("presence", "list", "laterality", "plane", "modality")


class ChatSession:
    def __init__(self, image: sitk.Image, structures=None, *, image_model="auto",
                 image_model_factory: Callable[[], object] | None = None):
        """``image_model``: an image-model engine, ``"auto"`` to build the default one on first need
        (``image_model_factory`` overrides how), or None for none (image-only questions then say so)."""
        if image.GetDimension() != 3:
            raise ChatError(f"the chat needs a 3D image; this one is {image.GetDimension()}D")
        self.image = image
        self.structures = structures
        self._image_model = image_model
        self._factory = image_model_factory
        self._image_model_error: str | None = None

    # -- the image model, built once on first need ------------------------------------------------------------------
    def image_model(self):
        if self._image_model == "auto":
            try:
                if self._factory is not None:
                    self._image_model = self._factory()
                else:
                    from .engines.image import ImageModelEngine

                    self._image_model = ImageModelEngine.default()
            except PrismRTError as exc:  # no weights, no CLIP role: image-only questions say why
                self._image_model, self._image_model_error = None, str(exc)
        return self._image_model

    def known_names(self) -> list[str]:
        return list(self.structures.names) if self.structures is not None else []

    # -- asking -----------------------------------------------------------------------------------------------------
    def ask(self, question: str, slice: "SliceRef | str | None" = None) -> Answer:
        ref = SliceRef.parse(slice)
        if ref is not None:
            structure_engine.check_slice(self.image, ref)
        question = (question or "").strip()
        if not question:
            return Answer.cannot_tell("the question is empty: type a question about the image", source="parser")
        readings = question_parser.parse(question, self.known_names())
        if not readings:
            return Answer.cannot_tell(
                "I did not understand the question. I can answer questions about the header (slice thickness, pixel "
                "size, field of view, modality, plane), about loaded structures (presence on a slice, volume, side, "
                "distance, overlap) and, from the pixels, about organ visibility, plane and target presence",
                source="parser", confidence=0.9, slice=str(ref) if ref else None)
        best = readings[0]
        if best.confidence < CLARIFY_BELOW and len(readings) > 1:
            second = readings[1]
            return Answer(f"Did you mean: {question_parser.describe(best)}, or {question_parser.describe(second)}?",
                          best.confidence, "parser", status=CLARIFY, kind=best.kind, slice=str(ref) if ref else None,
                          readings=[question_parser.describe(best), question_parser.describe(second)],
                          intent=best.to_dict())
        context = ChatContext(self.image, ref, self.structures, None)
        answer = self._answer(best, context)
        answer.confidence = float(answer.confidence) * (best.confidence if answer.status == ANSWERED else 1.0)
        answer.kind = answer.kind or best.kind
        answer.intent = best.to_dict()
        if answer.slice is None and ref is not None:
            answer.slice = str(ref)
        return answer

    def _answer(self, intent, context: ChatContext) -> Answer:
        if intent.kind in HEADER_KINDS:
            answer = header_engine.answer(intent, context)
            if answer is not None and answer.status != CANNOT_TELL:
                return answer
            fallback = self._from_image(intent, context)
            return fallback if fallback is not None else answer
        answer = structure_engine.answer(intent, context)
        if answer is not None and answer.status != CANNOT_TELL:
            return answer
        fallback = self._from_image(intent, context)
        if fallback is not None:
            return fallback
        if answer is not None:
            return answer
        return Answer.cannot_tell("no loaded structure and no image model can answer this", source="structures",
                                  kind=intent.kind)

    def _from_image(self, intent, context: ChatContext) -> Answer | None:
        if intent.kind not in IMAGE_KINDS:
            return None
        model = self.image_model()
        if model is None:
            if self._image_model_error and intent.kind in ("presence", "list", "laterality"):
                return Answer.cannot_tell(f"no structure set answers this and the image model is unavailable "
                                          f"({self._image_model_error})", source="image model", kind=intent.kind)
            return None
        context.image_model = model
        return model.answer(intent, context)

    def ask_many(self, items, progress=None):
        """Batch: ``items`` of (id, question, slice); yields (id, Answer). The image model caches features per
        slice, so many questions on one slice cost one backbone pass."""
        for n, (qid, question, slice) in enumerate(items):
            try:
                answer = self.ask(question, slice)
            except PrismRTError as exc:
                answer = Answer.cannot_tell(str(exc), source="parser")
            if progress is not None:
                progress(n + 1)
            yield qid, answer
