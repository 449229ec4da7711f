"""Parameter symmetries of transformers: specs, and pure transforms acting on params pytrees.

See `_spec` for the data model (groups, actions, fragment builders) and `apply` for exactly
how each group element acts on each axis.
"""

from rotjax.symmetry._canonical import (
    Norm,
    StreamSpec,
    canonicalize,
    is_canonical,
    with_stream_rotation,
)
from rotjax.symmetry._fragments import (
    attention,
    dense,
    embedding,
    group,
    layer_norm,
    mlp,
    param,
    permutation,
)
from rotjax.symmetry._spec import (
    KINDS,
    ROLES,
    Action,
    Group,
    ParamSpec,
    Spec,
    check_dtypes,
    check_spec,
    validate,
)
from rotjax.symmetry._transform import (
    Transform,
    apply,
    apply_to_leaf,
    check_elements,
    check_stream_form,
    check_transform,
    compose,
    identity,
    identity_element,
    invert,
    moved_streams,
    ones_complement,
    pair_rotations,
    sample,
)

__all__ = [
    "KINDS",
    "ROLES",
    "Action",
    "Group",
    "Norm",
    "ParamSpec",
    "Spec",
    "StreamSpec",
    "Transform",
    "apply",
    "apply_to_leaf",
    "attention",
    "canonicalize",
    "check_dtypes",
    "check_elements",
    "check_spec",
    "check_stream_form",
    "check_transform",
    "compose",
    "dense",
    "embedding",
    "group",
    "identity",
    "identity_element",
    "invert",
    "is_canonical",
    "layer_norm",
    "mlp",
    "moved_streams",
    "ones_complement",
    "pair_rotations",
    "param",
    "permutation",
    "sample",
    "validate",
    "with_stream_rotation",
]
