"""Small random test cases shared by the linear-attention test suites (reference, xla, kernels).

Usage::

    @pytest.mark.parametrize("case", cases.GLA_CASES, ids=cases.ids)
    def test_something(case, key):
        x = case.make_inputs(key)      # dict, see Case.make_inputs
        o, s = reference.gated_linear_attention(x["q"], x["k"], x["v"], x["log_decay"],
                                                scale=x["scale"],
                                                initial_state=x["initial_state"],
                                                segment_ids=x["segment_ids"])
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

Gate = Literal["none", "head", "key"]


@dataclasses.dataclass(frozen=True)
class Case:
    """One random problem. ``gate``: "none", "head" ([B,T,H] log decay) or "key" ([B,T,H,K]).

    ``op`` is "gla" or "delta" (the delta rule has no "key" gate and takes beta).
    ``decay`` is the typical size of the per-step log decay: "mild" (about -0.05..-1) or
    "strong" (about -20 per step: naive exp(cumsum) over a chunk underflows).
    """

    B: int
    T: int
    H: int
    K: int
    V: int
    gate: Gate = "head"
    chunk: int = 16
    dtype: str = "float32"
    with_initial_state: bool = False
    with_segments: bool = False
    op: Literal["gla", "delta"] = "gla"
    decay: Literal["mild", "strong"] = "mild"

    def __post_init__(self):
        if self.op == "delta" and self.gate == "key":
            raise ValueError("the delta rule has no per-key gate")

    @property
    def id(self) -> str:
        parts = [
            self.op,
            f"B{self.B}T{self.T}H{self.H}K{self.K}V{self.V}",
            f"gate-{self.gate}",
            f"C{self.chunk}",
            self.dtype,
        ]
        if self.with_initial_state:
            parts.append("s0")
        if self.with_segments:
            parts.append("seg")
        if self.decay != "mild":
            parts.append(self.decay)
        return "_".join(parts)

    def make_inputs(self, key) -> dict:
        """Fresh random inputs.

        Returns a dict with ``q, k, v`` (``[B,T,H,K|V]`` in ``self.dtype``), ``log_decay``
        (float32 or None), ``beta`` (float32 ``[B,T,H]`` in (0,1), None for GLA),
        ``initial_state`` (float32 ``[B,H,K,V]`` or None), ``segment_ids`` (int32 ``[B,T]`` or
        None; at least one boundary per row when present), and ``scale`` (``K ** -0.5``).
        Delta-rule keys are L2-normalised per token (as DeltaNet does) so the recurrence is
        contractive.

        The values are drawn with numpy from a seed taken from ``key``: eager ``jax.random``
        calls compile a threefry kernel per new shape (~1 s each on a loaded CPU), which
        dominated the test time.
        """
        B, T, H, K, V = self.B, self.T, self.H, self.K, self.V
        seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()
        rng = np.random.default_rng(seed)
        f32 = np.float32

        def normal(*shape):
            return rng.standard_normal(shape).astype(f32)

        q, k, v = normal(B, T, H, K), normal(B, T, H, K), normal(B, T, H, V)
        beta = None
        if self.op == "delta":
            k = k / np.linalg.norm(k, axis=-1, keepdims=True)
            beta = (1.0 / (1.0 + np.exp(-normal(B, T, H)))).astype(f32)
        else:
            k = (k * K**-0.5).astype(f32)
        gshape = {"none": None, "head": (B, T, H), "key": (B, T, H, K)}[self.gate]
        log_decay = None
        if gshape is not None:
            x = normal(*gshape)
            if self.decay == "strong":
                log_decay = (-20.0 + 5.0 * np.tanh(x)).astype(f32)
            else:
                log_decay = (-np.logaddexp(0.0, -(x + 2.5))).astype(f32)  # log_sigmoid
        initial_state = normal(B, H, K, V) if self.with_initial_state else None
        segment_ids = None
        if self.with_segments:
            starts = rng.random((B, T)) < 0.15
            starts[:, 0] = False
            if T > 1:
                starts[:, max(T // 2, 1)] = True
            segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
        dtype = jnp.dtype(self.dtype)

        def arr(a, dt=None):
            return None if a is None else jnp.asarray(a if dt is None else a.astype(dt))

        return {
            "q": arr(q, dtype),
            "k": arr(k, dtype),
            "v": arr(v, dtype),
            "log_decay": arr(log_decay),
            "beta": arr(beta),
            "initial_state": arr(initial_state),
            "segment_ids": arr(segment_ids),
            "scale": K**-0.5,
        }


def normal(key, shape, dtype=jnp.float32):
    """Standard-normal array drawn with numpy from a seed taken from ``key`` (no compile)."""
    seed = np.asarray(jax.random.key_data(key), np.uint32).ravel().tolist()
    x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
    return jnp.asarray(x.astype(jnp.dtype(dtype)))


def ids(case: Case) -> str:
    return case.id


def _gla(*a, **kw) -> Case:
    return Case(*a, op="gla", **kw)


def _delta(*a, **kw) -> Case:
    return Case(*a, op="delta", **kw)


# Small cases: each runs in well under a second with the interpreter-free paths.
GLA_CASES: list[Case] = [
    _gla(1, 16, 1, 16, 16, gate="none"),
    _gla(2, 32, 2, 16, 32, gate="head"),
    _gla(2, 40, 2, 32, 16, gate="key"),  # T not a multiple of the chunk
    _gla(1, 48, 2, 16, 16, gate="head", chunk=32, with_initial_state=True),
    _gla(2, 37, 1, 16, 16, gate="key", with_initial_state=True, with_segments=True),
    _gla(1, 64, 2, 32, 32, gate="head", chunk=32, with_segments=True),
    _gla(1, 33, 2, 64, 64, gate="key", chunk=16, dtype="bfloat16", with_initial_state=True),
    _gla(1, 50, 1, 16, 16, gate="key", chunk=16, decay="strong", with_initial_state=True),
    _gla(1, 50, 1, 16, 16, gate="head", chunk=32, decay="strong", with_segments=True),
]

DELTA_CASES: list[Case] = [
    _delta(1, 16, 1, 16, 16, gate="none"),
    _delta(2, 32, 2, 16, 32, gate="head"),
    _delta(2, 40, 2, 32, 16, gate="none", with_initial_state=True),  # T not a chunk multiple
    _delta(1, 48, 2, 16, 16, gate="head", chunk=32, with_initial_state=True),
    _delta(2, 37, 1, 16, 16, gate="head", with_initial_state=True, with_segments=True),
    _delta(1, 64, 2, 32, 32, gate="none", chunk=32, with_segments=True),
    _delta(1, 33, 2, 64, 64, gate="head", chunk=16, dtype="bfloat16", with_initial_state=True),
    _delta(1, 50, 1, 16, 16, gate="head", chunk=16, decay="strong", with_initial_state=True),
]

ALL_CASES: list[Case] = GLA_CASES + DELTA_CASES
