"""The residual block and the decoder LM (beyond the shared suites in test_suites.py)."""

from __future__ import annotations

import subprocess
import sys
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlayers import attention, core, mlp, norms
from jaxlayers.models import block, lm
from jaxlayers.models.block import BlockConfig
from jaxlayers.models.lm import LMConfig
from tests import tolerances
from tests._asserts import assert_rel_close

D, V, T, B = 16, 32, 8, 2


def _attn(num_heads=4, num_kv_heads=2, max_decode_len=16, **kw):
    return attention.Config(
        d_model=D,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        max_decode_len=max_decode_len,
        **kw,
    )


def _lm(num_layers=2, placement="pre", **kw) -> LMConfig:
    return LMConfig.uniform(
        vocab_size=V,
        d_model=D,
        num_layers=num_layers,
        mixer=_attn(),
        mlp=mlp.swiglu(D, 32),
        placement=placement,
        **kw,
    )


def _tokens(key, shape=(B, T)):
    return jax.random.randint(key, shape, 0, V, jnp.int32)


# Shared jitted entry points: tests with the same config and shapes reuse one compilation.
_apply = jax.jit(lm.apply, static_argnames=("cfg",))
_loss = jax.jit(lm.loss, static_argnames=("cfg",))
_prefill = jax.jit(lm.prefill, static_argnames=("cfg",))
_generate = jax.jit(lm.generate, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k"))


# ----------------------------------------------------------------------------------------------
# Block
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("norm", "placement"), [("rms", "pre"), ("layer", "peri")], ids=["rms-pre", "layer-peri"]
)
def test_block_matches_formula(key, placement, norm):
    cfg = BlockConfig(
        d_model=D, mixer=_attn(), mlp=mlp.swiglu(D, 32), norm=norm, placement=placement
    )
    k1, k2 = jax.random.split(key)
    params = block.init(k1, cfg)

    # Give the norms non-trivial scales so a swapped norm would show.
    def perturb(path, a):
        name = jax.tree_util.keystr(path)
        if "norm" not in name:
            return a
        k = jax.random.fold_in(k2, zlib.crc32(name.encode()) & 0x7FFFFFFF)
        return a + 0.1 * jax.random.normal(k, a.shape)

    params = jax.tree_util.tree_map_with_path(perturb, params)
    x = jax.random.normal(k2, (B, T, D))
    ncfg = (norms.RMSNormConfig if norm == "rms" else norms.LayerNormConfig)(dim=D, eps=1e-6)

    @jax.jit
    def both(p, x):
        def n(name, h):
            return core.apply(p[name], h, ncfg)

        u = attention.apply(p["mixer"], n("mixer_norm", x), cfg.mixer)
        h = x + (n("mixer_out_norm", u) if placement == "peri" else u)
        w = mlp.apply(p["mlp"], n("mlp_norm", h), cfg.mlp)
        want = h + (n("mlp_out_norm", w) if placement == "peri" else w)
        return block.apply(p, x, cfg), want

    got, want = both(params, x)
    assert_rel_close(got, want, tolerances.forward(jnp.float32))
    names = set(params)
    assert ("mixer_out_norm" in names) == (placement == "peri")
    assert ("mlp_out_norm" in names) == (placement == "peri")


def test_block_without_mlp(key):
    cfg = BlockConfig(d_model=D, mixer=_attn())
    params = block.init(key, cfg)
    assert set(params) == {"mixer_norm", "mixer"}
    x = jax.random.normal(key, (B, T, D))

    @jax.jit
    def both(p, x):
        want = x + attention.apply(
            p["mixer"], core.apply(p["mixer_norm"], x, cfg.norm_config), cfg.mixer
        )
        return block.apply(p, x, cfg), want

    got, want = both(params, x)
    assert_rel_close(got, want, tolerances.forward(jnp.float32))


def test_block_rejects_bad_norm():
    with pytest.raises(ValueError, match="norm must be one of"):
        BlockConfig(d_model=D, mixer=_attn(), norm="batch")


def test_block_rejects_bad_placement():
    with pytest.raises(ValueError, match="placement must be one of"):
        BlockConfig(d_model=D, mixer=_attn(), placement="post")


def test_block_rejects_unregistered_mixer():
    with pytest.raises(KeyError, match="no layer registered for config class"):
        BlockConfig(d_model=D, mixer=object())


def test_block_rejects_wrong_width(key):
    cfg = BlockConfig(d_model=D, mixer=_attn())
    with pytest.raises(ValueError, match=r"x.shape\[-1\] \(d_model\) must be 16"):
        block.apply(block.init(key, cfg), jnp.ones((B, T, D + 1)), cfg)


def test_block_rejects_wrong_rank(key):
    cfg = BlockConfig(d_model=D, mixer=_attn())
    with pytest.raises(ValueError, match=r"x must have rank 3 \(\[batch, time, d_model\]\)"):
        block.apply(block.init(key, cfg), jnp.ones((T, D)), cfg)


# ----------------------------------------------------------------------------------------------
# LM: params, apply, loss
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_lm_param_names_and_shapes(key, tie):
    cfg = _lm(num_layers=3, tie_embeddings=tie)
    params = lm.init(key, cfg)
    want = {"embed", "blocks", "final_norm"} | (set() if tie else {"unembed"})
    assert set(params) == want
    assert set(params["blocks"]) == {"0", "1", "2"}
    assert params["embed"]["embedding"].shape == (V, D)
    if not tie:
        assert params["unembed"]["kernel"].shape == (D, V)
        assert core.logical_axes(lm.param_specs(cfg))["unembed"]["kernel"] == ("embed", "vocab")
    logits = _apply(params, _tokens(key), cfg=cfg)
    assert logits.shape == (B, T, V) and logits.dtype == jnp.float32


def test_lm_tied_logits_use_embedding(key):
    cfg = _lm(num_layers=1, final_norm=None)
    params = lm.init(key, cfg)
    tokens = _tokens(key)

    @jax.jit
    def both(p, tokens):
        x = p["embed"]["embedding"][tokens]
        h = block.apply(p["blocks"]["0"], x, cfg.blocks[0])
        return lm.apply(p, tokens, cfg), h @ p["embed"]["embedding"].T

    got, want = both(params, tokens)
    assert_rel_close(got, want, tolerances.forward(jnp.float32))


def _sgd_losses(cfg, key, steps=20, lr=0.5):
    params = lm.init(key, cfg)
    # A learnable toy task: every sequence counts up by one (mod V) from a random start.
    start = jax.random.randint(key, (8, 1), 0, V, jnp.int32)
    tokens = (start + jnp.arange(12, dtype=jnp.int32)[None]) % V
    batch = {"tokens": tokens}

    @jax.jit
    def train_step(p):
        (loss, _), g = jax.value_and_grad(lm.loss, has_aux=True)(p, batch, cfg)
        return jax.tree.map(lambda a, b: a - lr * b, p, g), loss

    losses = []
    for _ in range(steps):
        params, loss = train_step(params)
        losses.append(float(loss))
    return losses


@pytest.mark.parametrize("placement", ["pre", "peri"])
def test_loss_decreases_with_sgd(key, placement):
    losses = _sgd_losses(_lm(placement=placement), key)
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.6 * losses[0], losses


def test_loss_shift_convention(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    tokens = _tokens(key, (B, T))
    implicit, m1 = _loss(params, {"tokens": tokens}, cfg=cfg)
    targets = jnp.concatenate([tokens[:, 1:], jnp.zeros_like(tokens[:, :1])], 1)
    mask = jnp.ones((B, T)).at[:, -1].set(0.0)
    explicit, m2 = _loss(params, {"tokens": tokens, "targets": targets, "mask": mask}, cfg=cfg)
    np.testing.assert_allclose(implicit, explicit, rtol=1e-6)
    assert float(m1["num_tokens"]) == float(m2["num_tokens"]) == B * (T - 1)
    # By hand: mean over the first T-1 positions of -log softmax(logits)[next token].
    logp = jax.nn.log_softmax(_apply(params, tokens, cfg=cfg))
    nll = -jnp.take_along_axis(logp[:, :-1], tokens[:, 1:, None], -1)
    np.testing.assert_allclose(implicit, jnp.mean(nll), rtol=1e-6)


def test_loss_ignores_masked_and_cross_segment_targets(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    tokens = _tokens(key, (B, T))
    segment_ids = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]] * B, jnp.int32)
    _, metrics = _loss(params, {"tokens": tokens, "segment_ids": segment_ids}, cfg=cfg)
    # T-1 shifted targets minus the one that crosses from segment 1 into segment 2.
    assert float(metrics["num_tokens"]) == B * (T - 2)
    mask = jnp.zeros((B, T)).at[:, :2].set(1.0)
    _, metrics = _loss(params, {"tokens": tokens, "mask": mask}, cfg=cfg)
    assert float(metrics["num_tokens"]) == B * 2


def test_segment_positions():
    seg = jnp.array([[1, 1, 2, 2, 2, 3], [4, 4, 4, 4, 5, 5]], jnp.int32)
    want = [[0, 1, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]
    np.testing.assert_array_equal(lm.segment_positions(seg), want)


def test_packed_segments_match_separate_sequences(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    a, b = _tokens(key, (1, 3)), _tokens(jax.random.fold_in(key, 1), (1, 5))
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1, 1, 1, 2, 2, 2, 2, 2]], jnp.int32)

    @jax.jit
    def both(p, packed, a, b):
        got = lm.apply(p, packed, cfg, segment_ids=seg, positions=lm.segment_positions(seg))
        return got, jnp.concatenate([lm.apply(p, a, cfg), lm.apply(p, b, cfg)], 1)

    got, want = both(params, packed, a, b)
    assert_rel_close(got, want, tolerances.forward(jnp.float32))


# ----------------------------------------------------------------------------------------------
# Hybrid stacks, scan-stacked layers
# ----------------------------------------------------------------------------------------------


def test_hybrid_pattern_builds_and_runs(key):
    local = _attn(num_heads=2, num_kv_heads=1, use_rope=False)
    full = _attn()
    cfg = LMConfig.hybrid(
        vocab_size=V,
        d_model=D,
        pattern="LLLA",
        mixers={"L": local, "A": full},
        mlp={"L": None, "A": mlp.swiglu(D, 32)},
        num_layers=8,
        placement="peri",
    )
    assert [b.mixer for b in cfg.blocks] == [local, local, local, full] * 2
    assert [b.mlp is None for b in cfg.blocks] == [True, True, True, False] * 2
    params = lm.init(key, cfg)
    assert set(params["blocks"]) == {str(i) for i in range(8)}
    assert "mlp" not in params["blocks"]["0"] and "mlp" in params["blocks"]["3"]
    assert params["blocks"]["0"]["mixer"]["q"]["kernel"].shape == (D, 2 * (D // 2))
    tokens = _tokens(key)
    logits = _assert_decode_matches(params, cfg, tokens)
    assert logits.shape == (B, T, V) and bool(jnp.all(jnp.isfinite(logits)))


def test_hybrid_rejects_missing_mixer():
    with pytest.raises(ValueError, match=r"mixers must have a config for every letter.*\['A'\]"):
        LMConfig.hybrid(vocab_size=V, d_model=D, pattern="LLLA", mixers={"L": _attn()})


def test_lm_rejects_mismatched_block_width():
    other = BlockConfig(d_model=2 * D, mixer=attention.Config(d_model=2 * D, num_heads=4))
    with pytest.raises(ValueError, match=r"blocks\[0\].d_model must equal d_model=16; got 32"):
        LMConfig(vocab_size=V, d_model=D, blocks=(other,))


def test_lm_rejects_empty_stack():
    with pytest.raises(ValueError, match="blocks must hold at least one BlockConfig"):
        LMConfig(vocab_size=V, d_model=D, blocks=())


def test_lm_rejects_float_tokens(key):
    cfg = _lm(num_layers=1)
    with pytest.raises(TypeError, match="tokens must have an integer dtype"):
        lm.apply(lm.init(key, cfg), jnp.ones((B, T)), cfg)


def test_lm_rejects_wrong_token_rank(key):
    cfg = _lm(num_layers=1)
    with pytest.raises(ValueError, match=r"tokens must have rank 2 \(\[batch, time\]\)"):
        lm.apply(lm.init(key, cfg), jnp.ones((T,), jnp.int32), cfg)


def test_scan_layers_rejects_mixed_stack():
    with pytest.raises(ValueError, match="scan_layers=True needs identical blocks"):
        LMConfig.hybrid(
            vocab_size=V,
            d_model=D,
            pattern="AB",
            mixers={"A": _attn(), "B": _attn(num_heads=2)},
            scan_layers=True,
        )


def test_scan_layers_match_unrolled(key):
    cfg = _lm(num_layers=3)
    scan_cfg = cfg.replace(scan_layers=True, remat=True)
    params = lm.init(key, cfg)
    stacked = dict(params)
    stacked["blocks"] = jax.tree.map(
        lambda *xs: jnp.stack(xs), *[params["blocks"][str(i)] for i in range(3)]
    )
    specs = lm.param_specs(scan_cfg)
    assert core.logical_axes(specs)["blocks"]["mixer"]["q"]["kernel"] == (
        "layers",
        "embed",
        "heads",
    )
    abstract = core.abstract_params(specs)
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(lambda a: a.shape, stacked)
    tokens = _tokens(key)
    want = _apply(params, tokens, cfg=cfg)
    got = _assert_decode_matches(stacked, scan_cfg, tokens)
    assert_rel_close(got, want, tolerances.forward(jnp.float32))
    # Gradients flow through the scanned, rematerialised stack.
    g = jax.jit(jax.grad(lambda p: lm.loss(p, {"tokens": tokens}, scan_cfg)[0]))(stacked)
    assert all(bool(jnp.any(a != 0)) for a in jax.tree.leaves(g))


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _assert_decode_matches(params, cfg, tokens):
    """Step-by-step and prefill logits equal apply's; returns apply's logits."""
    want = _apply(params, tokens, cfg=cfg)

    @jax.jit
    def decode(p, toks):
        def body(s, tok):
            logits, s = lm.step(p, s, tok, cfg)
            return s, logits

        _, out = jax.lax.scan(body, lm.init_state(cfg, toks.shape[0]), toks.T)
        return jnp.moveaxis(out, 0, 1)

    tol = tolerances.RECURRENT_FORWARD[jnp.dtype(jnp.float32)]
    assert_rel_close(decode(params, tokens), want, tol, name="step logits")
    last, _ = _prefill(params, tokens, cfg=cfg)
    assert_rel_close(last, want[:, -1], tol, name="prefill logits")
    return want


def _greedy_by_apply(params, cfg, prompt, n):
    """Greedy continuation from full forward passes over a fixed-size (causal) buffer."""
    t0 = prompt.shape[1]
    toks = jnp.concatenate([prompt, jnp.zeros((prompt.shape[0], n), jnp.int32)], 1)
    for i in range(n):
        logits = _apply(params, toks, cfg=cfg)[:, t0 + i - 1]
        toks = toks.at[:, t0 + i].set(jnp.argmax(logits, -1).astype(jnp.int32))
    return toks[:, t0:]


def test_generate_greedy_is_deterministic_and_matches_apply(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    prompt = _tokens(key, (B, 4))
    out1 = _generate(params, prompt, cfg=cfg, key=jax.random.key(1), max_new_tokens=4)
    out2 = _generate(params, prompt, cfg=cfg, key=jax.random.key(2), max_new_tokens=4)
    assert out1.shape == (B, 4) and out1.dtype == jnp.int32
    np.testing.assert_array_equal(out1, out2)
    np.testing.assert_array_equal(out1, _greedy_by_apply(params, cfg, prompt, 4))


def test_generate_sampling(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    prompt = _tokens(key, (B, 4))
    greedy = _generate(params, prompt, cfg=cfg, key=key, max_new_tokens=4)
    top1 = _generate(params, prompt, cfg=cfg, key=key, max_new_tokens=4, temperature=1.0, top_k=1)
    np.testing.assert_array_equal(top1, greedy)
    hot = [
        _generate(params, prompt, cfg=cfg, key=jax.random.key(s), max_new_tokens=4, temperature=5.0)
        for s in range(3)
    ]
    assert all(bool(jnp.all((h >= 0) & (h < V))) for h in hot)
    assert any(not np.array_equal(hot[0], h) for h in hot[1:])


def test_generate_one_token(key):
    cfg = _lm()
    params = lm.init(key, cfg)
    prompt = _tokens(key, (B, 4))
    out = _generate(params, prompt, cfg=cfg, key=key, max_new_tokens=1)
    np.testing.assert_array_equal(out, _greedy_by_apply(params, cfg, prompt, 1))


def test_generate_rejects_bad_top_k(key):
    cfg = _lm(num_layers=1)
    with pytest.raises(ValueError, match=r"top_k must be in \[1, vocab_size=32\]; got 0"):
        lm.generate(
            lm.init(key, cfg),
            _tokens(key),
            cfg,
            key=key,
            max_new_tokens=2,
            temperature=1.0,
            top_k=0,
        )


def test_generate_rejects_negative_temperature(key):
    cfg = _lm(num_layers=1)
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        lm.generate(
            lm.init(key, cfg), _tokens(key), cfg, key=key, max_new_tokens=2, temperature=-1.0
        )


def test_generate_rejects_zero_new_tokens(key):
    cfg = _lm(num_layers=1)
    with pytest.raises(ValueError, match="max_new_tokens must be positive; got 0"):
        lm.generate(lm.init(key, cfg), _tokens(key), cfg, key=key, max_new_tokens=0)


# ----------------------------------------------------------------------------------------------
# Packaging
# ----------------------------------------------------------------------------------------------


def test_import_jaxlayers_leaves_optax_and_orbax_unimported():
    code = (
        "import sys, jaxlayers, jaxlayers.registry, jaxlayers.models; "
        "jaxlayers.dense; "
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('optax', 'orbax')); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    env_code = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert env_code.returncode == 0, env_code.stdout + env_code.stderr
