"""Float64 NumPy attention with a hand-written backward pass: the independent oracle of the tests.

It shares no code with attn: masks are explicit boolean predicates, masked logits are -inf and
fully masked rows are set to zero by hand, gradients come from the closed-form softmax backward.
Shapes: q [B, T, N, H], k [B, S, K, H], v [B, S, K, Hv], mask / bias [B, N, T, S].
"""

import numpy as np


def attention(q, k, v, *, mask=None, bias=None, scale=None, softcap=None, dout=None):
  """Output [B, T, N, Hv] and weights [B, N, T, S]; with `dout`, also (dq, dk, dv)."""
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  batch, q_len, num_heads, head_dim = q.shape
  kv_len, num_kv_heads = k.shape[1], k.shape[2]
  groups = num_heads // num_kv_heads
  k_rep, v_rep = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
  scale = 1.0 / np.sqrt(head_dim) if scale is None else scale

  scores = np.einsum("btnh,bsnh->bnts", q, k_rep) * scale
  capped = softcap * np.tanh(scores / softcap) if softcap else scores
  logits = capped + (0.0 if bias is None else np.asarray(bias, np.float64))
  full = np.ones((batch, num_heads, q_len, kv_len), bool)
  mask = full if mask is None else np.broadcast_to(mask, full.shape)
  valid = mask.any(axis=-1, keepdims=True)
  row_max = np.where(valid, np.max(np.where(mask, logits, -np.inf), -1, keepdims=True), 0.0)
  e = np.where(mask, np.exp(np.where(mask, logits - row_max, 0.0)), 0.0)
  p = e / np.where(valid, e.sum(-1, keepdims=True), 1.0)
  out = np.einsum("bnts,bsnh->btnh", p, v_rep)
  if dout is None:
    return out, p

  dout = np.asarray(dout, np.float64)
  dp = np.einsum("btnh,bsnh->bnts", dout, v_rep)
  dv_rep = np.einsum("bnts,btnh->bsnh", p, dout)
  dlogits = p * (dp - (dp * p).sum(-1, keepdims=True))
  dscores = dlogits * (1.0 - np.tanh(scores / softcap) ** 2) if softcap else dlogits
  dq = np.einsum("bnts,bsnh->btnh", dscores, k_rep) * scale
  dk_rep = np.einsum("bnts,btnh->bsnh", dscores, q) * scale

  def fold(x):  # sum the G query heads that share each key/value head
    return x.reshape(batch, kv_len, num_kv_heads, groups, x.shape[-1]).sum(3)

  return out, p, (dq, fold(dk_rep), fold(dv_rep))


def positions(q_len, kv_len):
  """Query positions [T, 1] and key positions [1, S] for predicate masks (top-left aligned)."""
  return np.arange(q_len)[:, None], np.arange(kv_len)[None, :]


def directional_derivative(loss, inputs, index, direction, eps=1e-6):
  """(loss(x + eps d) - loss(x - eps d)) / (2 eps), moving input `index` along `direction`."""
  plus, minus = list(inputs), list(inputs)
  plus[index] = np.asarray(inputs[index], np.float64) + eps * direction
  minus[index] = np.asarray(inputs[index], np.float64) - eps * direction
  return (loss(*plus) - loss(*minus)) / (2 * eps)


def check_gradients(loss64, grads, inputs, rng, *, rtol=2e-4, atol=1e-4):
  """Each gradient, projected on a random direction, against float64 central differences."""
  for index, grad in enumerate(grads):
    direction = rng.normal(size=np.shape(inputs[index]))
    numeric = directional_derivative(loss64, inputs, index, direction)
    np.testing.assert_allclose(np.sum(np.asarray(grad, np.float64) * direction), numeric,
                               rtol=rtol, atol=atol, err_msg=f"input {index}")


def linear_attention(phi_q, phi_k, v, *, mask=None, normalize=True, dout=None):
  """Kernelized attention from features, the T x S way, in float64.

  phi_q [B, T, N, F], phi_k [B, S, K, F], v [B, S, K, Hv], mask [B|1, N|1, T, S] (True =
  attend). A = mask * phi_q phi_k^T, W = A / rowsum(A) (rows without keys: 0), out = W v.
  Returns out [B, T, N, Hv] and W [B, N, T, S]; with `dout`, also (dphi_q, dphi_k, dv).
  """
  phi_q, phi_k, v = (np.asarray(x, np.float64) for x in (phi_q, phi_k, v))
  batch, q_len, num_heads, _ = phi_q.shape
  kv_len, num_kv_heads = phi_k.shape[1], phi_k.shape[2]
  groups = num_heads // num_kv_heads
  k_rep, v_rep = np.repeat(phi_k, groups, axis=2), np.repeat(v, groups, axis=2)
  keep = np.ones((batch, num_heads, q_len, kv_len), bool)
  keep = keep if mask is None else np.broadcast_to(mask, keep.shape)
  a = np.where(keep, np.einsum("btnf,bsnf->bnts", phi_q, k_rep), 0.0)
  den = a.sum(-1, keepdims=True) if normalize else np.ones_like(a[..., :1])
  den = np.where(den == 0.0, 1.0, den)
  w = a / den
  out = np.einsum("bnts,bsnh->btnh", w, v_rep)
  if dout is None:
    return out, w

  dout = np.asarray(dout, np.float64)
  dw = np.einsum("btnh,bsnh->bnts", dout, v_rep)
  dv_rep = np.einsum("bnts,btnh->bsnh", w, dout)
  da = (dw - (dw * w).sum(-1, keepdims=True)) / den if normalize else dw
  da = np.where(keep, da, 0.0)
  dphi_q = np.einsum("bnts,bsnf->btnf", da, k_rep)
  dk_rep = np.einsum("bnts,btnf->bsnf", da, phi_q)

  def fold(x):  # sum the G query heads that share each key/value head
    return x.reshape(batch, kv_len, num_kv_heads, groups, x.shape[-1]).sum(3)

  return out, w, (dphi_q, fold(dk_rep), fold(dv_rep))
