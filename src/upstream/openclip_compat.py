"""open_clip_train's WebDataset reader, made to work with the webdataset upstream pins.

webdataset ≥ 0.2.90 marks the end of every shard with an empty ``{}`` item, and
open_clip_train 3.3.0's ``group_by_keys_nothrow`` reads ``item["fname"]`` unguarded, so its
training loader dies with ``KeyError: 'fname'`` at the first shard end (open_clip #935; its
``training`` extra pins webdataset ≤ 0.2.86). :func:`patch_open_clip` swaps in a tar reader that
asks webdataset for no end marker. ``tests/test_loader_compat.py`` shows the crash without the
patch, so that the day open_clip fixes it upstream is noticed.

The replacement is a function of this module (not a closure), so that DataLoader workers
started with ``spawn`` unpickle it; under ``fork`` they inherit the patched module anyway.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

_ORIGINAL = "_upstream_original_tarfile_to_samples_nothrow"


def tarfile_to_samples_nothrow(
    src: Iterable[dict[str, Any]], handler: Callable[[Exception], bool] | None = None
) -> Iterator[dict[str, Any]]:
    """open_clip_train's tar → samples stage, without webdataset's ``{}`` end-of-shard item."""
    from open_clip_train import data
    from webdataset.tariterators import tar_file_expander, url_opener

    handler = handler or data.log_and_continue
    streams = url_opener(src, handler=handler)
    files = tar_file_expander(streams, handler=handler, eof_value=None)
    return data.group_by_keys_nothrow(files, handler=handler)


def patch_open_clip() -> bool:
    """Make ``open_clip_train.data.get_wds_dataset`` read shards with webdataset ≥ 0.2.90.

    Idempotent; returns True when it patched, False when already patched. Call it before
    building open_clip's data (``get_data``/``get_wds_dataset``): they look the reader up then.
    """
    from open_clip_train import data

    if hasattr(data, _ORIGINAL):
        return False
    setattr(data, _ORIGINAL, data.tarfile_to_samples_nothrow)
    data.tarfile_to_samples_nothrow = tarfile_to_samples_nothrow
    return True


def unpatch_open_clip() -> None:
    """Undo :func:`patch_open_clip` (for tests that show the unpatched behaviour)."""
    from open_clip_train import data

    original = getattr(data, _ORIGINAL, None)
    if original is not None:
        data.tarfile_to_samples_nothrow = original
        delattr(data, _ORIGINAL)


def main(argv: list[str] | None = None) -> None:
    """``python -m upstream.openclip_compat ARGS``: open_clip's trainer
    (``python -m open_clip_train.main ARGS``) with the patch applied, e.g. on upstream's shards:
    ``--train-data 'dir/shard-{000000..000031}.tar' --dataset-type webdataset``."""
    import sys

    from open_clip_train.main import main as train

    import upstream.models  # noqa: F401 - registers upstream's tiny model configs with open_clip

    patch_open_clip()
    train(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
