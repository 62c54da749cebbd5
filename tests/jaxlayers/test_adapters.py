"""LoRA-family adapters over Dense params: each against a naive form of its equation, the
identity start, merge == apply, unmerge == base, MatryoshkaKV at r = head_dim == uncompressed
attention; one test per error message."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import adapters, attention, core, dense
from tests import tolerances
from tests._asserts import assert_rel_close

F32 = tolerances.forward(jnp.float32)


def _base(rng, d_in=8, d_out=12, use_bias=True):
    cfg = dense.Config(d_in=d_in, d_out=d_out, use_bias=use_bias)
    params = {"kernel": jnp.asarray(rng.standard_normal((d_in, d_out)) / 3, jnp.float32)}
    if use_bias:
        params["bias"] = jnp.asarray(rng.standard_normal(d_out), jnp.float32)
    return params, cfg


def _randomize(rng, tree, scale=0.3):
    return jax.tree.map(
        lambda a: jnp.asarray(rng.standard_normal(a.shape) * scale, jnp.float32), tree
    )


def _np(tree):
    return jax.tree.map(lambda a: np.asarray(a, np.float64), tree)


ALL = [
    adapters.LoRA(rank=3, alpha=6.0),
    adapters.Bone(block=4),
    adapters.LoRAMixer(num_experts=3, rank=2, alpha=2.0),
    adapters.SSF(),
    adapters.MatryoshkaKV(num_heads=3, rank=2),
]


@pytest.mark.parametrize("adapter_cfg", ALL, ids=lambda c: type(c).__name__)
def test_starts_equal_to_base(adapter_cfg, key):
    rng = np.random.default_rng(0)
    base, cfg = _base(rng)
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    adapter = adapters.init_adapter(key, base, adapter_cfg)
    # Same tree from the params or the config.
    from_cfg = adapters.init_adapter(key, cfg, adapter_cfg)
    assert jax.tree.structure(adapter) == jax.tree.structure(from_cfg)
    out = adapters.apply_adapted(base, adapter, x, cfg, adapter_cfg)
    want = dense.apply(base, x, cfg)
    if isinstance(adapter_cfg, adapters.MatryoshkaKV):
        want = adapters.project_heads(want, adapter, adapter_cfg)  # rank 2 < head_dim 4
        np.testing.assert_allclose(
            out, adapters.project_heads(out, adapter, adapter_cfg), rtol=1e-5, atol=1e-6
        )
    np.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


def test_lora_equation_merge_unmerge(key):
    rng = np.random.default_rng(1)
    base, cfg = _base(rng)
    lcfg = adapters.LoRA(rank=3, alpha=6.0)
    ad = _randomize(rng, adapters.init_adapter(key, base, lcfg))
    x = jnp.asarray(rng.standard_normal((4, 8)), jnp.float32)
    b, a = _np(base), _np(ad)
    want = np.asarray(x, np.float64) @ (b["kernel"] + 2.0 * a["lora_a"] @ a["lora_b"]) + b["bias"]
    out = adapters.apply_adapted(base, ad, x, cfg, lcfg)
    assert_rel_close(out, want, F32)
    merged = adapters.merge(base, ad, cfg, lcfg)
    assert_rel_close(dense.apply(merged, x, cfg), want, F32)
    back = adapters.unmerge(merged, ad, cfg, lcfg)
    np.testing.assert_allclose(back["kernel"], base["kernel"], atol=1e-6)


def test_bone_block_affine_equation(key):
    rng = np.random.default_rng(2)
    base, cfg = _base(rng, d_in=8, d_out=12)
    bcfg = adapters.Bone(block=4)
    ad = _randomize(rng, adapters.init_adapter(key, base, bcfg), 0.2)
    assert ad["bone"].shape == (3, 4, 4)
    w, c = np.asarray(base["kernel"], np.float64), np.asarray(ad["bone"], np.float64)
    want_w = w.copy()
    for j in range(2):  # input blocks
        for i in range(3):  # output blocks
            blk = w[4 * j : 4 * j + 4, 4 * i : 4 * i + 4]
            want_w[4 * j : 4 * j + 4, 4 * i : 4 * i + 4] = blk + c[i] @ blk + c[i]
    merged = adapters.merge(base, ad, cfg, bcfg)
    assert_rel_close(merged["kernel"], want_w, F32)
    x = jnp.asarray(rng.standard_normal((3, 8)), jnp.float32)
    want = np.asarray(x, np.float64) @ want_w + np.asarray(base["bias"], np.float64)
    assert_rel_close(adapters.apply_adapted(base, ad, x, cfg, bcfg), want, F32)
    back = adapters.unmerge(merged, ad, cfg, bcfg)
    np.testing.assert_allclose(back["kernel"], base["kernel"], atol=2e-6)


@pytest.mark.parametrize("top_k", [None, 2], ids=lambda k: f"top_k={k}")
def test_lora_mixer_routed_experts(top_k, key):
    rng = np.random.default_rng(3)
    base, cfg = _base(rng)
    mcfg = adapters.LoRAMixer(num_experts=3, rank=2, alpha=4.0, top_k=top_k)
    ad = _randomize(rng, adapters.init_adapter(key, base, mcfg))
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    b, a, xs = _np(base), _np(ad), np.asarray(x, np.float64)
    want = xs @ b["kernel"] + b["bias"]
    for n in range(5):
        logits = xs[n] @ a["router"]
        g = np.exp(logits - logits.max())
        g = g / g.sum()
        if top_k is not None:
            g = np.where(g >= np.sort(g)[-top_k], g, 0.0)
            g = g / g.sum()
        for e in range(3):
            want[n] += 2.0 * g[e] * (xs[n] @ a["lora_a"][e] @ a["lora_b"][e])
    assert_rel_close(adapters.apply_adapted(base, ad, x, cfg, mcfg), want, F32)
    gates = np.asarray(adapters.mixer_gates(ad, x, mcfg))
    np.testing.assert_allclose(gates.sum(-1), 1.0, rtol=1e-6)
    if top_k is not None:
        assert np.all((gates > 0).sum(-1) == top_k)


def test_ssf_scale_shift_merge(key):
    rng = np.random.default_rng(4)
    base, cfg = _base(rng)
    scfg = adapters.SSF()
    ad = adapters.init_adapter(key, base, scfg)
    ad = {"scale": 1 + _randomize(rng, ad["scale"]), "shift": _randomize(rng, ad["shift"])}
    x = jnp.asarray(rng.standard_normal((2, 3, 8)), jnp.float32)
    y = np.asarray(dense.apply(base, x, cfg), np.float64)
    want = y * np.asarray(ad["scale"]) + np.asarray(ad["shift"])
    assert_rel_close(adapters.apply_adapted(base, ad, x, cfg, scfg), want, F32)
    merged = adapters.merge(base, ad, cfg, scfg)
    assert_rel_close(dense.apply(merged, x, cfg), want, F32)
    back = adapters.unmerge(merged, ad, cfg, scfg)
    for name in ("kernel", "bias"):
        np.testing.assert_allclose(back[name], base[name], rtol=1e-5, atol=1e-6)


def _random_orthogonal_matryoshka(rng, key, base, mcfg):
    ad = adapters.init_adapter(key, base, mcfg)
    h, k, _ = ad["basis"].shape
    q, _ = np.linalg.qr(rng.standard_normal((h, k, k)))
    return {"basis": jnp.asarray(q, jnp.float32), "skew": _randomize(rng, ad["skew"])}


def test_matryoshka_full_rank_equals_uncompressed_attention(key):
    rng = np.random.default_rng(5)
    acfg = attention.Config(d_model=16, num_heads=4, num_kv_heads=2, implementation="reference")
    aparams = core.init(key, acfg)
    x = jnp.asarray(rng.standard_normal((2, 6, 16)), jnp.float32)
    kv_cfg = dense.Config(d_in=16, d_out=8, use_bias=False, kernel_axes=("embed", "heads"))
    mcfg = adapters.MatryoshkaKV(num_heads=2, rank=4)  # rank == head_dim
    merged = dict(aparams)
    for name in ("k", "v"):
        ad = _random_orthogonal_matryoshka(rng, key, aparams[name], mcfg)
        u = np.asarray(adapters.matryoshka_basis(ad, mcfg))
        np.testing.assert_allclose(
            np.swapaxes(u, 1, 2) @ u, np.broadcast_to(np.eye(4), u.shape), atol=1e-5
        )
        merged[name] = adapters.merge(aparams[name], ad, kv_cfg, mcfg)
        np.testing.assert_allclose(
            adapters.unmerge(merged[name], ad, kv_cfg, mcfg)["kernel"],
            aparams[name]["kernel"],
            atol=1e-5,
        )
    assert_rel_close(attention.apply(merged, x, acfg), attention.apply(aparams, x, acfg), 2e-5)


def test_matryoshka_truncated_scores_match_compressed_cache(key):
    rng = np.random.default_rng(6)
    base, cfg = _base(rng, d_in=8, d_out=12)
    mcfg = adapters.MatryoshkaKV(num_heads=3, rank=2)
    ad = _random_orthogonal_matryoshka(rng, key, base, mcfg)
    x = jnp.asarray(rng.standard_normal((5, 8)), jnp.float32)
    q = jnp.asarray(rng.standard_normal((5, 3, 4)), jnp.float32)
    k_full = adapters.apply_adapted(base, ad, x, cfg, mcfg).reshape(5, 3, 4)  # K P
    k_small = adapters.matryoshka_compress(base, ad, x, cfg, mcfg)  # K U_r  [5, 3, 2]
    assert k_small.shape == (5, 3, 2)
    u = adapters.matryoshka_basis(ad, mcfg)
    q_small = jnp.einsum("nhk,hkr->nhr", q, u)
    scores_full = jnp.einsum("nhk,mhk->hnm", q, k_full)
    scores_small = jnp.einsum("nhr,mhr->hnm", q_small, k_small)
    assert_rel_close(scores_small, scores_full, 2e-5)
    merged = adapters.merge(base, ad, cfg, mcfg)
    assert_rel_close(dense.apply(merged, x, cfg), k_full.reshape(5, 12), 2e-5)


def test_pca_basis_orders_directions(key):
    rng = np.random.default_rng(7)
    # keys of 2 heads living in a 2-dim subspace of R^4 with distinct spreads
    coords = rng.standard_normal((200, 2, 2)) * np.array([3.0, 1.0])
    dirs, _ = np.linalg.qr(rng.standard_normal((2, 4, 4)))
    keys = np.einsum("nhc,hkc->nhk", coords, dirs[:, :, :2])
    basis = np.asarray(adapters.pca_basis(jnp.asarray(keys, jnp.float32)))
    np.testing.assert_allclose(
        np.swapaxes(basis, 1, 2) @ basis, np.broadcast_to(np.eye(4), basis.shape), atol=1e-5
    )
    # rank 2 keeps these keys exactly
    proj = np.einsum("hkr,hlr->hkl", basis[..., :2], basis[..., :2])
    np.testing.assert_allclose(np.einsum("nhk,hkl->nhl", keys, proj), keys, atol=1e-4)


# ------------------------------------------------------------------------------ bad input


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


def test_rank_positive():
    with _raises(ValueError, "rank must be positive; got 0"):
        adapters.LoRA(rank=0)


def test_block_positive():
    with _raises(ValueError, "block must be positive; got 0"):
        adapters.Bone(block=0)


def test_mixer_top_k_range():
    with _raises(ValueError, "top_k must be in [1, num_experts=3] or None; got 4"):
        adapters.LoRAMixer(num_experts=3, rank=2, top_k=4)


def test_unknown_adapter_config(key):
    with _raises(TypeError, "adapter_cfg must be one of LoRA, Bone, LoRAMixer, SSF, MatryoshkaKV"):
        adapters.init_adapter(key, dense.Config(d_in=4, d_out=4), dense.Config(d_in=4, d_out=4))


def test_base_must_be_dense(key):
    with _raises(TypeError, "base_params_or_cfg must be a jaxlayers.dense.Config or Dense params"):
        adapters.init_adapter(key, {"w": jnp.zeros((4, 4))}, adapters.LoRA(rank=1))


def test_bone_block_divides_d_in(key):
    with _raises(ValueError, "d_in=6 must be divisible by block=4"):
        adapters.init_adapter(key, dense.Config(d_in=6, d_out=8), adapters.Bone(block=4))


def test_bone_block_divides_d_out(key):
    with _raises(ValueError, "d_out=6 must be divisible by block=4"):
        adapters.init_adapter(key, dense.Config(d_in=8, d_out=6), adapters.Bone(block=4))


def test_matryoshka_heads_divide_d_out(key):
    with _raises(ValueError, "d_out=10 must be divisible by num_heads=4"):
        adapters.init_adapter(
            key, dense.Config(d_in=8, d_out=10), adapters.MatryoshkaKV(num_heads=4, rank=1)
        )


def test_matryoshka_rank_at_most_head_dim(key):
    with _raises(ValueError, "MatryoshkaKV rank must be <= head_dim = d_out / num_heads = 4"):
        adapters.init_adapter(
            key, dense.Config(d_in=8, d_out=8), adapters.MatryoshkaKV(num_heads=2, rank=5)
        )


def test_mixer_cannot_merge(key):
    cfg = dense.Config(d_in=4, d_out=4)
    mcfg = adapters.LoRAMixer(num_experts=2, rank=1)
    base = dense.init(key, cfg)
    with _raises(ValueError, "LoRAMixer routes every token to its own mix of experts"):
        adapters.merge(base, adapters.init_adapter(key, base, mcfg), cfg, mcfg)


def test_ssf_merge_needs_bias(key):
    cfg = dense.Config(d_in=4, d_out=4, use_bias=False)
    base = dense.init(key, cfg)
    with _raises(ValueError, "merging SSF needs a base bias to absorb the shift"):
        adapters.merge(base, adapters.init_adapter(key, base, adapters.SSF()), cfg, adapters.SSF())


def test_matryoshka_truncated_cannot_unmerge(key):
    cfg = dense.Config(d_in=4, d_out=8)
    mcfg = adapters.MatryoshkaKV(num_heads=2, rank=2)
    base = dense.init(key, cfg)
    with _raises(ValueError, "MatryoshkaKV with rank=2 < head_dim=4 projects away"):
        adapters.unmerge(base, adapters.init_adapter(key, base, mcfg), cfg, mcfg)


def test_pca_samples_rank():
    with _raises(ValueError, "samples must have rank 3 ([num_samples, heads, head_dim])"):
        adapters.pca_basis(jnp.zeros((4, 4)))
