"""Direct float64 numpy implementations of the linear-attention mixers, written from the papers'
equations with an explicit state matrix and a Python loop over time (test oracles only)."""

from __future__ import annotations

import numpy as np


def f64(tree):
    """Every leaf of a (nested dict) param tree as a float64 numpy array."""
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def silu(x):
    return x / (1.0 + np.exp(-x))


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def softplus(x):
    return np.logaddexp(0.0, x)


def runs(segment_ids, b, t):
    """Sequence index per token: +1 wherever the segment id changes."""
    if segment_ids is None:
        return np.zeros((b, t), np.int64)
    seg = np.asarray(segment_ids)
    change = np.concatenate([np.zeros((b, 1), bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    return np.cumsum(change, axis=1)


def conv(x, kernel, bias=None, activation=None, segment_ids=None, cache=None):
    """y[b, t, c] = act(sum_j w[j, c] x[b, t - K + 1 + j, c] + bias[c]), same sequence only.

    Returns (y, final cache [b, K - 1, c]).
    """
    x = np.asarray(x, np.float64)
    b, t, c = x.shape
    ksize = kernel.shape[0]
    r = runs(segment_ids, b, t)
    cache = np.zeros((b, ksize - 1, c)) if cache is None else np.asarray(cache, np.float64)
    y = np.zeros_like(x)
    for bi in range(b):
        for ti in range(t):
            acc = np.zeros(c) if bias is None else bias.copy()
            for j in range(ksize):
                s = ti - ksize + 1 + j
                if s >= 0:
                    if r[bi, s] == r[bi, ti]:
                        acc += kernel[j] * x[bi, s]
                elif r[bi, ti] == 0:
                    acc += kernel[j] * cache[bi, ksize - 1 + s]
            y[bi, ti] = silu(acc) if activation == "silu" else acc
    final = np.zeros((b, ksize - 1, c))
    for bi in range(b):
        for j in range(ksize - 1):
            s = t - (ksize - 1) + j
            if s >= 0:
                if r[bi, s] == r[bi, -1]:
                    final[bi, j] = x[bi, s]
            elif r[bi, -1] == 0:
                final[bi, j] = cache[bi, ksize - 1 + s]
    return y, final


def l2(x, eps=1e-6):
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def rms(x, scale, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def features(p, x, names, use_conv=True, segment_ids=None, state=None):
    """Projections, then short conv + SiLU (or SiLU) of each name in ``names``."""
    out, caches = {}, {}
    for n in names:
        f = x @ p[n]["kernel"]
        if use_conv:
            cp = p[f"{n}_conv"]
            init = None if state is None else state[f"conv_{n}"]
            f, caches[f"conv_{n}"] = conv(
                f, cp["kernel"], cp.get("bias"), "silu", segment_ids, init
            )
        else:
            f = silu(f)
        out[n] = f
    return out, caches


def log_decay(p, x):
    """g = -exp(a_log) softplus(x W_a + dt_bias); W_a [d, groups*h] -> [..., groups*h]."""
    h = p["a_log"].shape[0]
    a = x @ p["kernel"]
    a = a.reshape(*a.shape[:-1], -1, h)
    return (-np.exp(p["a_log"]) * softplus(a + p["dt_bias"])).reshape(*a.shape[:-2], -1)


def update(S, k, v, beta, decay, delta):
    """One step of one head's state S [k, v]."""
    if delta:
        return decay * (S - beta * np.outer(k, k @ S)) + beta * np.outer(k, v)
    return decay * S + np.outer(k, v)


def deltanet(params, x, cfg, segment_ids=None, state=None):
    """(Gated) DeltaNet, token by token. Returns (y [b, t, d], final state dict)."""
    p = f64(params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, dk, dv = cfg.num_heads, cfg.key_dim, cfg.val_dim
    scale = dk**-0.5 if cfg.scale is None else cfg.scale
    f, caches = features(
        p, x, "qkv", use_conv=cfg.use_short_conv, segment_ids=segment_ids, state=state
    )
    q = l2(f["q"].reshape(b, t, h, dk))
    k = l2(f["k"].reshape(b, t, h, dk))
    v = f["v"].reshape(b, t, h, dv)
    beta = sigmoid(x @ p["beta"]["kernel"])
    g = log_decay(p["decay"], x) if "decay" in p else np.zeros((b, t, h))
    r = runs(segment_ids, b, t)
    S = np.zeros((b, h, dk, dv)) if state is None else np.array(state["recurrent"], np.float64)
    o = np.zeros((b, t, h, dv))
    for bi in range(b):
        for ti in range(t):
            if ti > 0 and r[bi, ti] != r[bi, ti - 1]:
                S[bi] = 0.0
            for hi in range(h):
                S[bi, hi] = update(
                    S[bi, hi],
                    k[bi, ti, hi],
                    v[bi, ti, hi],
                    beta[bi, ti, hi],
                    np.exp(g[bi, ti, hi]),
                    True,
                )
                o[bi, ti, hi] = S[bi, hi].T @ (scale * q[bi, ti, hi])
    y = rms(o, p["o_norm"]["scale"], cfg.norm_eps)
    if cfg.use_output_gate:
        y = y * silu((x @ p["g"]["kernel"]).reshape(b, t, h, dv))
    y = y.reshape(b, t, h * dv) @ p["o"]["kernel"]
    return y, {**caches, "recurrent": S}


def router(p, x, top_k):
    """(weights [b, t, M], selected [b, t, M], probs [b, t, M]) of the MoM router."""
    logits = x @ p["router"]["kernel"]
    e = np.exp(logits - logits.max(-1, keepdims=True))
    probs = e / e.sum(-1, keepdims=True)
    m = probs.shape[-1]
    order = np.argsort(-probs, axis=-1, kind="stable")[..., :top_k]
    selected = np.zeros_like(probs)
    np.put_along_axis(selected, order, 1.0, axis=-1)
    w = probs * selected
    w = w / w.sum(-1, keepdims=True)
    assert selected.shape[-1] == m
    return w, selected, probs


def mom(params, x, cfg, segment_ids=None, state=None):
    """Mixture-of-Memories, token by token. Returns (y [b, t, d], final state dict)."""
    p = f64(params)
    x = np.asarray(x, np.float64)
    b, t, _ = x.shape
    h, dk, dv, s, m = cfg.num_heads, cfg.key_dim, cfg.val_dim, cfg.num_slots, cfg.num_memories
    delta = cfg.update_rule in ("delta", "gated_delta")
    gated = cfg.update_rule in ("gated_delta", "gated_linear")
    scale = dk**-0.5 if cfg.scale is None else cfg.scale
    f, caches = features(
        p, x, "qkv", use_conv=cfg.use_short_conv, segment_ids=segment_ids, state=state
    )
    q = f["q"].reshape(b, t, h, dk)
    k = f["k"].reshape(b, t, s, h, dk)
    v = f["v"].reshape(b, t, s, h, dv)
    if delta:
        q, k = l2(q), l2(k)
    beta = sigmoid(x @ p["beta"]["kernel"]) if delta else np.ones((b, t, s * h))
    g = log_decay(p["decay"], x) if gated else np.zeros((b, t, s * h))
    beta, g = beta.reshape(b, t, s, h), g.reshape(b, t, s, h)
    w, selected, _ = router(p, x, cfg.top_k)
    r = runs(segment_ids, b, t)
    S = np.zeros((b, s * h, dk, dv)) if state is None else np.array(state["recurrent"], np.float64)
    S = S.reshape(b, s, h, dk, dv)
    o = np.zeros((b, t, h, dv))
    for bi in range(b):
        for ti in range(t):
            if ti > 0 and r[bi, ti] != r[bi, ti - 1]:
                S[bi] = 0.0
            for mi in range(s):
                shared = mi == m
                if not shared and selected[bi, ti, mi] == 0:
                    continue  # memory not routed: unchanged, read with weight 0
                weight = 1.0 if shared else w[bi, ti, mi]
                for hi in range(h):
                    S[bi, mi, hi] = update(
                        S[bi, mi, hi],
                        k[bi, ti, mi, hi],
                        v[bi, ti, mi, hi],
                        beta[bi, ti, mi, hi],
                        np.exp(g[bi, ti, mi, hi]),
                        delta,
                    )
                    o[bi, ti, hi] += weight * (S[bi, mi, hi].T @ (scale * q[bi, ti, hi]))
    y = rms(o, p["o_norm"]["scale"], cfg.norm_eps)
    if cfg.use_output_gate:
        y = y * silu((x @ p["g"]["kernel"]).reshape(b, t, h, dv))
    y = y.reshape(b, t, h * dv) @ p["o"]["kernel"]
    return y, {**caches, "recurrent": S.reshape(b, s * h, dk, dv)}
