"""Inside the train step: image augmentation."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def augment_images(
    batch: Mapping[str, jax.Array], key: jax.Array, *, max_shift: int = 2, flip: bool = True
) -> dict[str, jax.Array]:
    """Random horizontal flip (with ``flip``: not for digits or letters, which a mirror turns
    into other or no symbols) and a random shift of up to ``max_shift`` pixels (zero padded),
    per image of ``batch["images"]`` (NHWC); jittable, for `classification_steps`' augment."""
    images = batch["images"]
    n, h, w, _ = images.shape
    k_flip, k_shift = jax.random.split(key)
    if flip:
        mirror = jax.random.bernoulli(k_flip, 0.5, (n, 1, 1, 1))
        images = jnp.where(mirror, images[:, :, ::-1], images)
    m = max_shift
    padded = jnp.pad(images, ((0, 0), (m, m), (m, m), (0, 0)))
    shifts = jax.random.randint(k_shift, (n, 2), 0, 2 * m + 1)

    def crop(image, shift):
        return jax.lax.dynamic_slice(image, (shift[0], shift[1], 0), (h, w, image.shape[-1]))

    return {**batch, "images": jax.vmap(crop)(padded, shifts)}
