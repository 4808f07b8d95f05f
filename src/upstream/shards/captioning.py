"""The ``txt`` of every sample the shard stage writes: a source's own caption, or a template.

``captions`` chooses: ``own`` (the source's captions, an error for a source that has none),
``template`` (made from the class name) or ``auto`` (own where a sample has one, else the
template). ``caption_template`` is a string with ``{label}``, or ``clip`` for CLIP's 80
ImageNet prompts, one per image.

Decisions where the issue is silent:

- A template names the class at the configured label level: with ``label_level=coarse`` the
  superclass the hierarchy maps the class to (``rename``), otherwise the source's own class.
  Naming the fine class would give coarse and fine pre-training sets the same captions, and a
  CLIP model would learn the same thing from both. The names come from the hierarchy, not the plan:
  caption filters read captions while the plan is made, and a sample must be written with
  the caption it was filtered on. Unlabelled sources keep their class name (as the plan does).
- ``clip`` picks each image's prompt from a hash of (seed, source number, index): the same
  image gets the same prompt in every subset of a source and whatever else is in the mixture.
- Left at the default template, a source's own template is used where it has one (digits:
  "a photo of the digit {label}."); any other template applies to every source.
"""

from __future__ import annotations

import functools
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

from upstream.data import Source
from upstream.errors import UpstreamError

DEFAULT_CAPTION = "a photo of a {label}."
CLIP = "clip"


@functools.cache
def clip_templates() -> tuple[str, ...]:
    """CLIP's 80 ImageNet prompts as ``{label}`` templates, from the installed open_clip."""
    # Imported on first use only: open_clip pulls in its model code (seconds of start-up).
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    return tuple(t("{label}") for t in OPENAI_IMAGENET_TEMPLATES)


def __getattr__(name: str) -> Any:
    # ``CLIP_TEMPLATES`` reads like a constant but costs the open_clip import only when used.
    if name == "CLIP_TEMPLATES":
        return clip_templates()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def source_template(template: str, source: Source) -> str:
    """The template ``source`` is captioned with under the configured ``template``."""
    if template == DEFAULT_CAPTION and source.caption_template:
        return source.caption_template
    return template


def has_own_captions(source: Source) -> bool:
    """Whether ``source`` captions its images itself (judged by its first image)."""
    return len(source) > 0 and source.caption(0) is not None


class Captioner:
    """``caption(source number, index)`` for every image of a mixture; picklable, so that
    worker processes caption the images they encode.

    ``rename`` maps a class name to the name captions give it (a hierarchy's superclass, at
    ``label_level=coarse``); classes it does not name keep their own."""

    def __init__(
        self,
        mode: str,
        template: str,
        sources: Sequence[Source],
        names: Sequence[str],
        seed: int,
        rename: Mapping[str, str] | None = None,
    ) -> None:
        if mode not in ("auto", "own", "template"):
            raise UpstreamError(f"captions must be auto, own or template (got {mode!r})")
        for src, name in zip(sources, names, strict=True):
            if mode == "own" and not has_own_captions(src):
                raise UpstreamError(
                    f"shard: captions=own but {name} has no captions of its own "
                    "(use captions=auto or template)"
                )
        self.mode = mode
        self.sources = list(sources)
        self.names = list(names)
        self.seed = seed
        self.templates = [source_template(template, src) for src in sources]
        self.rename = dict(rename or {})
        self._clip = clip_templates() if CLIP in self.templates else ()

    def caption(self, source_no: int, index: int) -> str:
        src = self.sources[source_no]
        if self.mode != "template":
            own = src.caption(index)
            if own is not None:
                return own
            if self.mode == "own":
                raise UpstreamError(
                    f"shard: captions=own but image {index} of {self.names[source_no]} has no "
                    "caption"
                )
        template = self.templates[source_no]
        if template == CLIP:
            pick = zlib.crc32(f"{self.seed}/{source_no}/{index}".encode()) % len(self._clip)
            template = self._clip[pick]
        name = src.class_names[src.labels[index]]
        if src.has_labels:
            name = self.rename.get(name, name)
        return template.replace("{label}", name)

    __call__ = caption
