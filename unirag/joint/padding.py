"""Left-padded batches for the joint model: several prompts in one forward, then one decoding row per live sequence.

Left padding puts every row's last token in the last column, where decoding reads the logits, so all rows advance
in lockstep. The 2-D mask hides the padding and the position ids count each row's own tokens only, so a row's
logits are those of its prompt alone (up to float rounding). With no row padded (one prompt, or equal lengths)
mask and positions are None: exactly the unbatched forward.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def pad_token_id(tokenizer) -> int:
    """The id padding is written with (any id works: the mask hides it)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0


@dataclass
class LeftPadded:
    ids: torch.Tensor  # [B, W]
    mask: torch.Tensor | None  # [B, W] 1 = token, 0 = padding; None when no row is padded
    positions: torch.Tensor | None  # [B, W] position ids; None when no row is padded
    pads: list[int]  # left padding of each row
    lengths: list[int]  # tokens of each row

    def step(self, rows: Sequence[int], fed: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Mask [R, W + fed] and positions [R, 1] for a decoding step of R live sequences: sequence i continues
        prompt row `rows[i]` with `fed` tokens, the last of which is fed now."""
        if self.mask is None:
            return None, None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        grown = torch.ones(len(rows), fed, dtype=self.mask.dtype, device=self.mask.device)
        mask = torch.cat([self.mask[index], grown], dim=1)
        positions = torch.tensor([[self.lengths[r] + fed - 1] for r in rows], dtype=torch.long,
                                 device=self.mask.device)
        return mask, positions


def left_pad(rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str) -> LeftPadded:
    """Token id rows → one left-padded batch."""
    lengths = [len(r) for r in rows]
    width = max(lengths)
    pads = [width - n for n in lengths]
    ids = torch.tensor([[pad_id] * p + list(r) for p, r in zip(pads, rows, strict=True)], dtype=torch.long,
                       device=device)
    if not any(pads):
        return LeftPadded(ids, None, None, pads, lengths)
    mask = torch.tensor([[0] * p + [1] * n for p, n in zip(pads, lengths, strict=True)], dtype=torch.long,
                        device=device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return LeftPadded(ids, mask, positions, pads, lengths)


__all__ = ["LeftPadded", "left_pad", "pad_token_id"]
