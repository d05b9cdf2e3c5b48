"""The AlignmentRun API (alignment.dev/v1alpha1): pure pydantic models, no I/O."""

from .run import (
    API_VERSION, GROUP, KIND, PLURAL, SHORT_NAMES, SINGULAR, VERSION,
    AlignmentRun, RunInvalid, parse_run,
)
from .spec import (
    AlignmentRunSpec, DatasetSpec, EvalSpec, LoraSpec,
    ModelSpec, ResourcesSpec, StageSpec, StorageSpec, TrainerSpec, TrainingSpec,
)
from .status import AlignmentRunStatus, Condition, StageStatus

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "SHORT_NAMES", "SINGULAR", "VERSION",
    "AlignmentRun", "RunInvalid", "parse_run",
    "AlignmentRunSpec", "DatasetSpec", "EvalSpec",
    "LoraSpec", "ModelSpec", "ResourcesSpec", "StageSpec", "StorageSpec", "TrainerSpec", "TrainingSpec",
    "AlignmentRunStatus", "Condition", "StageStatus",
]
