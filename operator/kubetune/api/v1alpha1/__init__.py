"""FineTuneJob, kubetune.io/v1alpha1: the typed API and the single source of the CRD.

Field names are snake_case here and camelCase on the wire. Cross-field rules are ``Rule``s:
each is a CEL rule for the API server *and* a Python check for ``kubetune validate`` and the
trainer, with one message for both. One module per part of the spec; everything public is
imported from here.
"""

from pydantic import BaseModel

from kubetune.api.v1alpha1._base import (
    API_VERSION,
    DNS_SUBDOMAIN,
    ENV_NAME,
    GROUP,
    INT32_MAX,
    KIND,
    LABEL_VALUE,
    NO_CONTROL,
    OUTPUT_PATTERN,
    PLURAL,
    QUALIFIED_NAME,
    QUANTITY,
    SHORT_NAMES,
    SOURCE_HELP,
    SOURCE_PATTERN,
    TEMPLATES,
    TEXT,
    VERSION,
    Rule,
    StrMap,
    immutable,
)
from kubetune.api.v1alpha1.evaluation import (
    EvaluationSpec,
    LmEvalSpec,
)
from kubetune.api.v1alpha1.job import (
    ALL_RULES,
    NAME_PATTERN,
    FineTuneJob,
    ObjectMeta,
)
from kubetune.api.v1alpha1.method import (
    FreezeSpec,
    LoraSpec,
    MethodSpec,
    MethodType,
    QuantizationSpec,
    SpectrumSpec,
)
from kubetune.api.v1alpha1.output import (
    OutputSpec,
)
from kubetune.api.v1alpha1.preference import (
    CPO_LOSSES,
    DPO_LOSSES,
    PreferenceSpec,
)
from kubetune.api.v1alpha1.resources import (
    GPU_MEMORY,
    ResourcesSpec,
    RunPolicySpec,
    SchedulingSpec,
    Strategy,
    Toleration,
)
from kubetune.api.v1alpha1.rl import (
    GRPO_LOSSES,
    GrpoSpec,
    RewardSpec,
    RewardType,
)
from kubetune.api.v1alpha1.serve import ServeCheck, ServeSpec
from kubetune.api.v1alpha1.sources import (
    DatasetFormat,
    DatasetSpec,
    ModelSpec,
    SecretKeyRef,
    Source,
)
from kubetune.api.v1alpha1.spec import (
    STAGE_MESSAGE,
    FineTuneJobSpec,
    Stage,
)
from kubetune.api.v1alpha1.status import (
    Checkpoint,
    CheckResult,
    Condition,
    Failure,
    FineTuneJobStatus,
    Outputs,
    Progress,
    Serving,
)
from kubetune.api.v1alpha1.tracking import (
    Tracker,
    TrackingSpec,
)
from kubetune.api.v1alpha1.trainer import (
    NOT_SECRET_ENV,
    RESERVED_ENV,
    RESERVED_ENV_PREFIXES,
    SECRET_ENV_NAME,
    EnvVar,
    EnvVarSource,
    SecurityContext,
    TrainerSpec,
)
from kubetune.api.v1alpha1.training import (
    PACKED_CUTOFF_MAX,
    BoostersSpec,
    LrScheduler,
    OptimizerSpec,
    Precision,
    TrainingSpec,
)

__all__ = [
    "ALL_RULES",
    "API_VERSION",
    "BaseModel",
    "BoostersSpec",
    "Checkpoint",
    "CheckResult",
    "Condition",
    "ServeCheck",
    "ServeSpec",
    "Serving",
    "CPO_LOSSES",
    "DatasetFormat",
    "DatasetSpec",
    "DNS_SUBDOMAIN",
    "DPO_LOSSES",
    "ENV_NAME",
    "EnvVar",
    "EnvVarSource",
    "EvaluationSpec",
    "Failure",
    "FineTuneJob",
    "FineTuneJobSpec",
    "FineTuneJobStatus",
    "FreezeSpec",
    "GPU_MEMORY",
    "GROUP",
    "GRPO_LOSSES",
    "GrpoSpec",
    "immutable",
    "INT32_MAX",
    "KIND",
    "LABEL_VALUE",
    "LmEvalSpec",
    "LoraSpec",
    "LrScheduler",
    "MethodSpec",
    "MethodType",
    "ModelSpec",
    "NAME_PATTERN",
    "NO_CONTROL",
    "NOT_SECRET_ENV",
    "ObjectMeta",
    "OUTPUT_PATTERN",
    "Outputs",
    "OptimizerSpec",
    "OutputSpec",
    "PACKED_CUTOFF_MAX",
    "PLURAL",
    "Precision",
    "PreferenceSpec",
    "QuantizationSpec",
    "Progress",
    "QUALIFIED_NAME",
    "QUANTITY",
    "RESERVED_ENV",
    "RESERVED_ENV_PREFIXES",
    "ResourcesSpec",
    "RewardSpec",
    "RewardType",
    "Rule",
    "RunPolicySpec",
    "SchedulingSpec",
    "SpectrumSpec",
    "SECRET_ENV_NAME",
    "SecretKeyRef",
    "SHORT_NAMES",
    "Source",
    "SOURCE_HELP",
    "SOURCE_PATTERN",
    "Stage",
    "STAGE_MESSAGE",
    "Strategy",
    "StrMap",
    "TEMPLATES",
    "TEXT",
    "Toleration",
    "Tracker",
    "TrackingSpec",
    "SecurityContext",
    "TrainerSpec",
    "TrainingSpec",
    "VERSION",
]
