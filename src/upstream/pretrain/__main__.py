"""One torchrun process: ``python -m upstream.pretrain CONFIG.json``.

torchrun (:func:`upstream.pretrain.stage._torchrun`, on one machine) and a PyTorchJob's pods
(:mod:`upstream.pretrain.job`) start every training process with this command.
"""

import sys
from pathlib import Path

from upstream.errors import UpstreamError
from upstream.logs import setup_logging
from upstream.pretrain.stage import PretrainConfig, pretrain

setup_logging()
try:
    from upstream import storage

    source = sys.argv[1]  # a local file (torchrun here) or an s3:// object (a PyTorchJob)
    text = storage.read_bytes(source).decode() if storage.is_s3(source) else Path(
        source).read_text()
    pretrain(PretrainConfig.model_validate_json(text))
except UpstreamError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
