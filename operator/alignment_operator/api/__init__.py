"""The AlignmentRun API (alignment.dev/v1alpha1): pure pydantic models, no I/O."""

from .run import (
    API_VERSION, GROUP, KIND, PLURAL, RETRY_ANNOTATION, SHORT_NAMES, SINGULAR, VERSION,
    AlignmentRun, RunInvalid, parse_run,
)
from .spec import (
    AlignmentRunSpec, DatasetSpec, EvalSpec, LoraSpec,
    ModelSpec, ResourcesSpec, StageSpec, StorageSpec, TrainerSpec, TrainingSpec,
)
from .status import AlignmentRunStatus, Condition, StageProgress, StageStatus
from .documents import load_run, run_documents  # noqa: E402  (after run: it imports parse_run)

__all__ = [
    "API_VERSION", "GROUP", "KIND", "PLURAL", "RETRY_ANNOTATION", "SHORT_NAMES", "SINGULAR", "VERSION",
    "AlignmentRun", "RunInvalid", "parse_run", "load_run", "run_documents",
    "AlignmentRunSpec", "DatasetSpec", "EvalSpec",
    "LoraSpec", "ModelSpec", "ResourcesSpec", "StageSpec", "StorageSpec", "TrainerSpec", "TrainingSpec",
    "AlignmentRunStatus", "Condition", "StageProgress", "StageStatus",
]
