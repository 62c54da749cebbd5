"""One test per error message of the core layers: each names the argument and the expected
value. Errors are raised at trace time (or at config construction), so no test runs a kernel."""

import re

import jax
import jax.numpy as jnp
import pytest

from jaxlayers import activations, attention, dense, embedding, mlp, norms, position


def _zeros_params(module, cfg):
    return jax.eval_shape(lambda: module.init(jax.random.key(0), cfg))


def _raises(exc, message):
    return pytest.raises(exc, match=re.escape(message))


# ---------------------------------------------------------------------------- wrong rank


def test_attention_wrong_rank():
    cfg = attention.Config(d_model=8, num_heads=2)
    with _raises(ValueError, "x must have rank 3 ([batch, time, d_model]); got shape (2, 8)"):
        jax.eval_shape(
            lambda p, x: attention.apply(p, x, cfg),
            _zeros_params(attention, cfg),
            jnp.zeros((2, 8)),
        )


def test_step_wrong_rank():
    cfg = attention.Config(d_model=8, num_heads=2, max_decode_len=4)
    with _raises(ValueError, "x_t must have rank 2 ([batch, d_model]); got shape (2, 1, 8)"):
        attention.step(
            _zeros_params(attention, cfg), attention.init_state(cfg, 2), jnp.zeros((2, 1, 8)), cfg
        )


def test_rope_wrong_rank():
    with _raises(ValueError, "x must have rank 4 ([batch, time, heads, head_dim]); got shape"):
        position.apply_rope(jnp.zeros((2, 3, 8)), jnp.zeros((2, 3), jnp.int32))


# ---------------------------------------------------------------- mismatched feature size


@pytest.mark.parametrize(
    "module,cfg,what",
    [
        (dense, dense.Config(d_in=12, d_out=4), "d_in"),
        (mlp, mlp.Config(d_model=12, d_hidden=4), "d_model"),
        (norms, norms.RMSNormConfig(dim=12), "dim"),
        (norms, norms.LayerNormConfig(dim=12), "dim"),
        (attention, attention.Config(d_model=12, num_heads=2), "d_model"),
    ],
    ids=["dense", "mlp", "rms_norm", "layer_norm", "attention"],
)
def test_feature_size_mismatch(module, cfg, what):
    with _raises(ValueError, f"x.shape[-1] ({what}) must be 12; got 10 (shape (2, 3, 10))"):
        module.apply(_zeros_params(module, cfg), jnp.zeros((2, 3, 10)), cfg)


def test_unembedding_feature_size_mismatch():
    cfg = embedding.Config(vocab_size=5, d_model=12)
    with _raises(ValueError, "x.shape[-1] (d_model) must be 12; got 10"):
        embedding.attend(_zeros_params(embedding, cfg), jnp.zeros((2, 10)), cfg)


def test_dense_scalar_input():
    cfg = dense.Config(d_in=3, d_out=2)
    with _raises(ValueError, "x must have rank >= 1 ([..., d_in=3]); got shape ()"):
        dense.apply(_zeros_params(dense, cfg), jnp.zeros(()), cfg)


# ------------------------------------------------------------------------------ wrong dtype


def test_int_input_to_dense():
    cfg = dense.Config(d_in=4, d_out=2)
    with _raises(TypeError, "x must have a floating dtype (float32, bfloat16, ...); got int32"):
        dense.apply(_zeros_params(dense, cfg), jnp.zeros((2, 4), jnp.int32), cfg)


def test_float_tokens_to_embedding():
    cfg = embedding.Config(vocab_size=5, d_model=4)
    with _raises(TypeError, "tokens must have an integer dtype (int32, ...); got float32"):
        embedding.apply(_zeros_params(embedding, cfg), jnp.zeros((2, 3), jnp.float32), cfg)


def test_float_segment_ids():
    cfg = attention.Config(d_model=8, num_heads=2)
    with _raises(TypeError, "segment_ids must have an integer dtype (int32); got float32"):
        attention.apply(
            _zeros_params(attention, cfg), jnp.zeros((2, 3, 8)), cfg, segment_ids=jnp.zeros((2, 3))
        )


# ----------------------------------------------------------------------- head counts


def test_d_model_not_divisible_by_heads():
    with _raises(ValueError, "d_model=10 must be divisible by num_heads=4"):
        attention.Config(d_model=10, num_heads=4)


def test_heads_not_divisible_by_kv_heads():
    with _raises(ValueError, "num_heads=4 must be divisible by num_kv_heads=3"):
        attention.Config(d_model=16, num_heads=4, num_kv_heads=3)


def test_odd_head_dim_with_rope():
    with _raises(ValueError, "head_dim must be even with use_rope=True; got 5"):
        attention.Config(d_model=16, num_heads=4, head_dim=5)


def test_rope_frequencies_odd_dim():
    with _raises(ValueError, "head_dim must be a positive even number; got head_dim=7"):
        position.rope_frequencies(7)


def test_rope_fraction_out_of_range():
    with _raises(ValueError, "fraction must be in [0, 1]; got fraction=1.5"):
        position.rotary_dim(8, 1.5)


# ------------------------------------------------------------------ unknown choices


def test_unknown_activation():
    msg = f"activation must be one of {activations.NAMES}; got 'gelu2'"
    with _raises(ValueError, msg):
        activations.get("gelu2")
    with _raises(ValueError, msg):
        mlp.Config(d_model=4, d_hidden=8, activation="gelu2")


def test_unknown_mlp_variant():
    with _raises(ValueError, "variant must be one of ('mlp', 'glu'); got 'moe'"):
        mlp.Config(d_model=4, d_hidden=8, variant="moe")


def test_unknown_attention_implementation():
    with _raises(ValueError, "implementation must be one of ('xla', 'reference', 'cudnn'); got"):
        attention.Config(d_model=8, num_heads=2, implementation="flash")


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="cuDNN is available on GPU")
def test_cudnn_needs_gpu():
    cfg = attention.Config(d_model=8, num_heads=2, implementation="cudnn", dtype=jnp.bfloat16)
    with _raises(NotImplementedError, "implementation='cudnn' needs a GPU backend; got backend"):
        attention.apply(_zeros_params(attention, cfg), jnp.zeros((1, 3, 8)), cfg)


def test_dense_kernel_axes_length():
    with _raises(ValueError, "kernel_axes must name the 2 kernel dims (in, out); got ('embed',)"):
        dense.Config(d_in=2, d_out=2, kernel_axes=("embed",))


# ----------------------------------------------------- positions, segments and the KV cache


def test_positions_shape():
    with _raises(ValueError, "positions must have shape (batch, time) = (2, 3); got shape (2, 4)"):
        position.apply_rope(jnp.zeros((2, 3, 1, 8)), jnp.zeros((2, 4), jnp.int32))


def test_segment_ids_shape():
    cfg = attention.Config(d_model=8, num_heads=2)
    with _raises(ValueError, "segment_ids must have shape (batch, time) = (2, 3); got (1, 3)"):
        attention.apply(
            _zeros_params(attention, cfg),
            jnp.zeros((2, 3, 8)),
            cfg,
            segment_ids=jnp.zeros((1, 3), jnp.int32),
        )


def test_segment_ids_with_cache():
    cfg = attention.Config(d_model=8, num_heads=2, max_decode_len=4)
    with _raises(ValueError, "segment_ids cannot be combined with a KV cache"):
        attention.apply(
            _zeros_params(attention, cfg),
            jnp.zeros((2, 3, 8)),
            cfg,
            segment_ids=jnp.zeros((2, 3), jnp.int32),
            return_state=True,
        )


def test_prompt_longer_than_cache():
    cfg = attention.Config(d_model=8, num_heads=2, max_decode_len=4)
    with _raises(ValueError, "x.shape[1] (time) must be <= max_decode_len=4 to return a KV cache"):
        attention.apply(_zeros_params(attention, cfg), jnp.zeros((1, 5, 8)), cfg, return_state=True)
