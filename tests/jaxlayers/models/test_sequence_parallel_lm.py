"""A hybrid decoder LM with its time axis sharded over 4 of 8 fake CPU devices == one device.

The LM stacks GLA (``gated_linear_attention``), Gated DeltaNet (``delta_rule`` plus short
convolutions: the halo exchange) and softmax attention (all-gathered keys / values, global RoPE
positions). ``T = 37`` pads to 40 = 4 shards x 10 tokens (not a multiple of 4 x chunk); the
packed segment ids put boundaries on shard starts (tokens 10, 20) and inside shards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxlayers import attention, core, mlp, registry
from jaxlayers.models import lm
from jaxlayers.models import sequence_parallel as sp
from pallas_kernels.linear_attention import api
from pallas_kernels.linear_attention.sequence_context import sequence_parallel_axis
from tests import tolerances
from tests._asserts import assert_rel_close

D, VOCAB, B, T = 16, 32, 4, 37
F32 = jnp.float32
# The programs are small: XLA's CPU backend optimizations only lengthen their compile.
_FAST_COMPILE = {"xla_backend_optimization_level": 0}


def _run(fn, *args):
    """``jax.jit(fn)(*args)``, compiled without backend optimizations."""
    return jax.jit(fn).lower(*args).compile(_FAST_COMPILE)(*args)


@pytest.fixture(scope="module")
def mesh():
    return Mesh(np.array(jax.devices()[:8]).reshape(2, 4), ("data", "sequence"))


def _mixer(name: str):
    registry.import_all()
    return core.layer_fns(name).example.config


def _hybrid(pattern: str = "GDA") -> lm.LMConfig:
    mixers = {
        "G": _mixer("gla"),
        "D": _mixer("gated_deltanet"),
        "A": attention.Config(d_model=D, num_heads=4, num_kv_heads=2, max_decode_len=64),
    }
    return lm.LMConfig.hybrid(
        vocab_size=VOCAB,
        d_model=D,
        pattern=pattern,
        mixers={c: mixers[c] for c in set(pattern)},
        mlp=mlp.Config(d_model=D, d_hidden=32, activation="silu", variant="glu"),
        tie_embeddings=False,
    )


def _segment_ids(b: int, t: int) -> jax.Array:
    seg = np.zeros((b, t), np.int32)
    starts = [(10, 13, 25), (20, 33), (4, 30), ()]
    for r in range(b):
        for s in starts[r % 4]:
            seg[r, s:] += 1
    return jnp.asarray(seg)


def _tokens(seed: int, b: int = B, t: int = T) -> jax.Array:
    return jnp.asarray(np.random.default_rng(seed).integers(0, VOCAB, (b, t)), jnp.int32)


def _assert_grads_close(got, want):
    flat_got = jax.tree_util.tree_flatten_with_path(got)[0]
    flat_want = jax.tree.leaves(want)
    assert len(flat_got) == len(flat_want)
    for (path, g), w in zip(flat_got, flat_want, strict=True):
        assert_rel_close(g, w, tolerances.grad(F32), name=jax.tree_util.keystr(path))


def test_hybrid_lm_loss_and_grads_match_one_device(mesh, key):
    cfg = _hybrid()
    params = lm.init(key, cfg)
    batch = {"tokens": _tokens(0), "segment_ids": _segment_ids(B, T)}

    def ref(p):
        return lm.loss(p, batch, cfg)

    def sharded(p):
        return sp.loss(p, batch, cfg, mesh=mesh)

    (l_ref, m_ref), g_ref = _run(jax.value_and_grad(ref, has_aux=True), params)
    (l_sp, m_sp), g_sp = _run(jax.value_and_grad(sharded, has_aux=True), params)
    assert_rel_close(l_sp, l_ref, tolerances.forward(F32), name="loss")
    assert_rel_close(m_sp["accuracy"], m_ref["accuracy"], 1e-6, name="accuracy")
    assert float(m_sp["num_tokens"]) == float(m_ref["num_tokens"])
    _assert_grads_close(g_sp, g_ref)


def test_logits_match_with_explicit_positions(mesh, key):
    """``apply`` without segment ids; positions offset by 5 reach attention's RoPE globally."""
    cfg = _hybrid("GA")
    params = lm.init(key, cfg)
    tokens = _tokens(1)
    positions = jnp.broadcast_to(5 + jnp.arange(T, dtype=jnp.int32), (B, T))
    ref = _run(lambda p: lm.apply(p, tokens, cfg, positions=positions), params)
    got = _run(lambda p: sp.apply(p, tokens, cfg, mesh=mesh, positions=positions), params)
    assert got.shape == (B, T, VOCAB)
    assert_rel_close(got, ref, tolerances.forward(F32), name="logits")


def test_non_causal_attention_masks_the_padding(mesh, key):
    """T = 10 pads to 12: a non-causal layer must not see the 2 padded tokens."""
    a = attention.Config(d_model=D, num_heads=2, causal=False, max_decode_len=16)
    cfg = lm.LMConfig.uniform(vocab_size=VOCAB, d_model=D, num_layers=1, mixer=a)
    params = lm.init(key, cfg)
    tokens = _tokens(2, 2, 10)
    ref = _run(lambda p: lm.apply(p, tokens, cfg), params)
    got = _run(lambda p: sp.apply(p, tokens, cfg, mesh=mesh), params)
    assert_rel_close(got, ref, tolerances.forward(F32), name="logits")


def test_linear_op_under_the_context_in_a_user_shard_map(key):
    """api.gated_linear_attention inside shard_map: initial state in, replicated final state."""
    mesh = Mesh(np.array(jax.devices()[:4]), ("sequence",))
    rng = np.random.default_rng(3)
    b, t, h, dk = 2, 24, 2, 16
    q, k, v = (jnp.asarray(rng.standard_normal((b, t, h, dk)), F32) for _ in range(3))
    g = jnp.asarray(-rng.uniform(0.01, 0.5, (b, t, h, dk)), F32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dk)), F32)
    seg = _segment_ids(b, t)
    o_ref, s_ref = _run(
        lambda *a: api.gated_linear_attention(
            *a[:4], initial_state=a[5], segment_ids=a[4], return_final_state=True
        ),
        q, k, v, g, seg, s0,
    )  # fmt: skip

    def body(q, k, v, g, seg, s0):
        with sequence_parallel_axis("sequence"):
            o, s = api.gated_linear_attention(
                q, k, v, g, initial_state=s0, segment_ids=seg, return_final_state=True
            )
        return o, s[None]

    timed = P(None, "sequence")
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(timed, timed, timed, timed, timed, P()),
        out_specs=(timed, P("sequence")),
        check_vma=False,
    )
    o, s = _run(fn, q, k, v, g, seg, s0)
    assert_rel_close(o, o_ref, tolerances.forward(F32), name="o")
    for i in range(4):  # every shard returns the global final state
        assert_rel_close(s[i], s_ref, tolerances.forward(F32), name=f"final state of shard {i}")


def test_error_unsupported_mixer(mesh, key):
    cfg = lm.LMConfig.uniform(vocab_size=VOCAB, d_model=16, num_layers=1, mixer=_mixer("lion"))
    with pytest.raises(NotImplementedError, match=r"mixer 'lion' .* of block 0 cannot run"):
        sp.loss({}, {"tokens": _tokens(0, 2, 8)}, cfg, mesh=mesh)


def test_error_linear_attention_with_normalizer(mesh):
    cfg = lm.LMConfig.uniform(
        vocab_size=VOCAB, d_model=32, num_layers=1, mixer=_mixer("linear_attention")
    )
    with pytest.raises(NotImplementedError, match="normalize=True"):
        sp.check_supported(cfg)


def test_error_short_conv_halo_longer_than_a_shard(mesh, key):
    conv = _mixer("short_conv")  # kernel_size 4: needs 3 tokens per shard
    cfg = lm.LMConfig.uniform(vocab_size=VOCAB, d_model=conv.d_model, num_layers=1, mixer=conv)
    params = lm.init(key, cfg)
    with pytest.raises(NotImplementedError, match="needs at least 3 tokens per sequence shard"):
        sp.apply(params, _tokens(0, 2, 8), cfg, mesh=mesh)


def test_error_attention_cache_under_the_context(key):
    a = attention.Config(d_model=D, num_heads=2, max_decode_len=16)
    params = attention.init(key, a)
    x = jnp.ones((1, 4, D), F32)
    with sequence_parallel_axis("sequence"):
        with pytest.raises(NotImplementedError, match="KV cache"):
            attention.apply(params, x, a, return_state=True)


def test_error_context_outside_shard_map(key):
    a = attention.Config(d_model=D, num_heads=2, max_decode_len=16)
    params = attention.init(key, a)
    with sequence_parallel_axis("sequence"):
        with pytest.raises(ValueError, match="no enclosing jax.shard_map binds the mesh axis"):
            attention.apply(params, jnp.ones((1, 4, D), F32), a)


def test_error_sequence_axis_not_in_mesh(mesh):
    with pytest.raises(ValueError, match="sequence_axis must be one of the mesh axes"):
        sp.loss({}, {"tokens": _tokens(0, 2, 8)}, _hybrid("A"), mesh=mesh, sequence_axis="time")


# --------------------------------------------------------------------------------------------
# Every mixer declared sequence-parallel, alone, against its unsharded self. Those already in
# the hybrid LM above, and the slower compiles, run with the slow tests only.
# --------------------------------------------------------------------------------------------

_SLOW_MIXERS = {"attention", "deltanet", "gated_deltanet", "gla", "mom"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.slow) if n in _SLOW_MIXERS else n
        for n in sorted(sp.SEQUENCE_PARALLEL_MIXERS)
    ],
)
def test_declared_mixer_matches_unsharded(name, key):
    mesh = Mesh(np.array(jax.devices()[:4]), ("sequence",))
    cfg = _mixer(name)
    if name == "linear_attention":
        cfg = cfg.replace(normalize=False)
    fns = core.layer_fns(name)
    d = cfg.d_model
    b, t = 2, 16
    x = jnp.asarray(np.random.default_rng(4).standard_normal((b, t, d)), F32)
    seg = _segment_ids(b, t)
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    params = fns.init(key, cfg)
    ref = _run(lambda p: fns.apply(p, x, cfg, segment_ids=seg, positions=pos), params)

    def body(p, x, seg, pos):
        with sequence_parallel_axis("sequence"):
            return fns.apply(p, x, cfg, segment_ids=seg, positions=pos)

    timed = P(None, "sequence")
    fn = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(P(), timed, timed, timed),
        out_specs=timed,
        check_vma=False,
    )
    got = _run(fn, params, x, seg, pos)
    assert_rel_close(got, ref, tolerances.forward(F32), name=name)
