"""Inter-op stage construction (Alpa's stage DP), pure numpy: no mesh, device or jax code.

``submesh_shapes`` / ``logical_views``: where a stage may run. ``cluster_layers``: ops into
layers. ``stage_dp``: layers into stages on sub-meshes; ``brute_force_stages`` cross-checks it.
"""

from dp_stages.brute import brute_force_stages
from dp_stages.dp import StageDPInput, StagePlan, best_stage_plan, plan_cost, stage_dp
from dp_stages.layers import cluster_layers
from dp_stages.submeshes import logical_views, num_devices, submesh_shapes

__all__ = [
    "StageDPInput",
    "StagePlan",
    "best_stage_plan",
    "brute_force_stages",
    "cluster_layers",
    "logical_views",
    "num_devices",
    "plan_cost",
    "stage_dp",
    "submesh_shapes",
]
