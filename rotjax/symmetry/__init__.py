"""Parameter symmetries of transformers: specs, and pure transforms acting on params pytrees.

See `_spec` for the data model (groups, actions, fragment builders) and `apply` for exactly
how each group element acts on each axis.
"""

from rotjax.symmetry._spec import (
    KINDS,
    ROLES,
    Action,
    Group,
    ParamSpec,
    Spec,
    attention,
    dense,
    embedding,
    layer_norm,
    mlp,
    param,
    permutation,
    validate,
)
from rotjax.symmetry._transform import (
    Transform,
    apply,
    apply_to_leaf,
    check_transform,
    compose,
    identity,
    identity_element,
    invert,
    sample,
)

__all__ = [
    "KINDS",
    "ROLES",
    "Action",
    "Group",
    "ParamSpec",
    "Spec",
    "Transform",
    "apply",
    "apply_to_leaf",
    "attention",
    "check_transform",
    "compose",
    "dense",
    "embedding",
    "identity",
    "identity_element",
    "invert",
    "layer_norm",
    "mlp",
    "param",
    "permutation",
    "sample",
    "validate",
]
