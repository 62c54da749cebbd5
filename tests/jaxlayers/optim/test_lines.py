"""LiNeS: lambda(l) = alpha + beta l / (L - 1) applied to the fine-tuning update, on an LM-like
tree (per-block and stacked layouts)."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers.optim import lines


def _tree(rng, stacked):
    blocks = (
        {"mlp": {"kernel": rng.standard_normal((3, 4, 4))}}
        if stacked
        else {str(i): {"mlp": {"kernel": rng.standard_normal((4, 4))}} for i in range(3)}
    )
    tree = {
        "embed": {"table": rng.standard_normal((10, 4))},
        "blocks": blocks,
        "final_norm": {"scale": rng.standard_normal(4)},
    }
    return tree


def _as_jnp(tree):
    return jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)


def test_scales():
    np.testing.assert_allclose(lines.lines_scales(5, 0.2, 0.8), [0.2, 0.4, 0.6, 0.8, 1.0])
    np.testing.assert_allclose(lines.lines_scales(1, 0.2, 0.8), [1.0])


@pytest.mark.parametrize("stacked", [False, True], ids=["per-block", "stacked"])
def test_merge_scales_update_by_depth(stacked):
    rng = np.random.default_rng(0)
    pre, ft = _as_jnp(_tree(rng, stacked)), _as_jnp(_tree(rng, stacked))
    out = lines.lines_merge(pre, ft, alpha=0.1, beta=0.9, num_layers=3)
    lam = [0.1, 0.55, 1.0]

    def want(p, f, s):
        return np.asarray(p) + s * (np.asarray(f) - np.asarray(p))

    np.testing.assert_allclose(
        out["embed"]["table"], want(pre["embed"]["table"], ft["embed"]["table"], lam[0]), rtol=1e-6
    )
    np.testing.assert_allclose(out["final_norm"]["scale"], ft["final_norm"]["scale"], rtol=1e-6)
    for i in range(3):
        if stacked:
            got, p, f = (
                out["blocks"]["mlp"]["kernel"][i],
                pre["blocks"]["mlp"]["kernel"][i],
                ft["blocks"]["mlp"]["kernel"][i],
            )
        else:
            got, p, f = (t["blocks"][str(i)]["mlp"]["kernel"] for t in (out, pre, ft))
        np.testing.assert_allclose(got, want(p, f, lam[i]), rtol=1e-5, atol=1e-6)


def test_alpha_one_beta_zero_returns_finetuned():
    rng = np.random.default_rng(1)
    pre, ft = _as_jnp(_tree(rng, False)), _as_jnp(_tree(rng, False))
    out = lines.lines_merge(pre, ft, alpha=1.0, beta=0.0, num_layers=3)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ft), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_error_layer_out_of_range():
    p = {"w": jnp.ones(2)}
    with pytest.raises(
        ValueError, match=r"layer_index must return a depth in \[0, 2\); got 5 for w"
    ):
        lines.lines_apply(p, p, alpha=0, beta=1, num_layers=2, layer_index=lambda path, x: 5)


def test_error_num_layers():
    with pytest.raises(ValueError, match=r"num_layers must be >= 1; got num_layers=0"):
        lines.lines_scales(0, 0.0, 1.0)


def test_import_optim_leaves_optax_unimported():
    code = (
        "import sys, jaxlayers.optim; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] == 'optax'); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
