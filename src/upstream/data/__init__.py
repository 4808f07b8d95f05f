"""Image sources for the shard stage, and the corruptions applied to them.

Every source gives ``(PIL RGB image, int label, metadata dict)`` samples and a list of class
names; the shard writer does the rest (resize, corruption, encoding, captions, tar files).
"""

from upstream.data.base import Source, fit
from upstream.data.corruptions import corrupt
from upstream.data.sources import KINDS, SourceSpec, check_source, open_source, parse_source

__all__ = [
    "KINDS",
    "Source",
    "SourceSpec",
    "check_source",
    "corrupt",
    "fit",
    "open_source",
    "parse_source",
]
