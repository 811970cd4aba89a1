"""Sparse attention patterns as boolean masks: BigBird blocks and Longformer global tokens.

Both are softmax attention under a structured mask, so they run through
`dot_product_attention(mask=...)` on every implementation and combine with the other mask kinds
(`is_causal`, lengths, segments). As dense `[.., T, S]` masks they show what the patterns compute,
not their memory savings; `local_window_size` and `chunk_size` are the structured (never
materialized by the blockwise path) forms of the window part.

Shapes: B batch, T query length, S key length; masks are `[1 or B, 1, T, S]`, True = attend.
"""

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array


def bigbird_mask(
    q_len: int,
    kv_len: int,
    *,
    block_size: int = 64,
    num_window_blocks: int = 3,
    num_global_blocks: int = 1,
    num_random_blocks: int = 2,
    seed: int = 0,
) -> Array:
  """`[1, 1, T, S]` BigBird block-sparse pattern (Zaheer et al. 2020): global + window + random.

  Positions are grouped into blocks of `block_size`. Query block i attends to
  - the `num_window_blocks` key blocks centred on i (sliding window, odd count),
  - the first `num_global_blocks` key blocks, whose queries in turn attend to everything
    (global tokens, ITC variant),
  - `num_random_blocks` other key blocks drawn without replacement, fixed by `seed`.

  Args:
    q_len: T.
    kv_len: S.
    block_size: positions per block.
    num_window_blocks: window width in blocks (odd; 3 = the own block and one each side).
    num_global_blocks: leading global blocks.
    num_random_blocks: random key blocks per query block.
    seed: fixes the random blocks (a static pattern, the same on every call).

  Returns:
    boolean `[1, 1, T, S]`.
  """
  if num_window_blocks % 2 != 1:
    raise ValueError(f"num_window_blocks must be odd (own block +- a radius), got "
                     f"{num_window_blocks}.")
  n_q, n_k = -(-q_len // block_size), -(-kv_len // block_size)
  i, j = np.arange(n_q)[:, None], np.arange(n_k)[None, :]
  radius = num_window_blocks // 2
  blocks = (np.abs(i - j) <= radius) | (j < num_global_blocks) | (i < num_global_blocks)
  rng = np.random.default_rng(seed)
  for row in range(num_global_blocks, n_q):
    free = np.flatnonzero(~blocks[row])
    if free.size:
      blocks[row, rng.choice(free, size=min(num_random_blocks, free.size), replace=False)] = True
  dense = np.repeat(np.repeat(blocks, block_size, axis=0), block_size, axis=1)
  return jnp.asarray(dense[:q_len, :kv_len])[None, None]


def longformer_mask(
    global_tokens: Array,
    window: int | tuple[int, int],
) -> Array:
  """`[B, 1, T, T]` Longformer self-attention (Beltagy et al. 2020): window + global tokens.

  Every token sees the keys in its sliding window; a global token (a [CLS], a question) sees every
  key and is seen by every query.

  Args:
    global_tokens: bool `[B, T]`, True where the token is global.
    window: `w` or `(left, right)`; `(w, 0)` with `is_causal` for a causal model.

  Returns:
    boolean `[B, 1, T, T]`.
  """
  left, right = (window, window) if isinstance(window, (int, np.integer)) else window
  global_tokens = jnp.asarray(global_tokens, bool)
  q_len = global_tokens.shape[1]
  i, j = np.arange(q_len)[:, None], np.arange(q_len)[None, :]
  band = jnp.asarray((j >= i - left) & (j <= i + right))[None]
  mask = band | global_tokens[:, :, None] | global_tokens[:, None, :]
  return mask[:, None]
