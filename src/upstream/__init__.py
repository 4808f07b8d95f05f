"""upstream: controlled studies of how pre-training data shapes transfer learning.

Every stage (shard, pretrain, finetune, evaluate) is a plain function over one pydantic
config model; the CLI, the Kubeflow components, the pipeline parameters and the MLflow
params are all derived from those models.
"""

__version__ = "0.1.0"
