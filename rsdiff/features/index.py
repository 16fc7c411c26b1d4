"""The channel index: which (timestep, block) each channel range of a feature vector came from."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from rsdiff.errors import ConfigError


@dataclass(frozen=True)
class ChannelRange:
    """Channels ``[start, stop)`` hold block ``block`` at timestep ``timestep``; ``ddpm_seg`` is the
    same block's number in DDPM-Seg's numbering (guided-diffusion's ``output_blocks[k]``), or None
    where it has none (``mid``, and a level's last res unit before its upsampler)."""

    timestep: int
    block: str
    start: int
    stop: int
    ddpm_seg: int | None = None


@dataclass(frozen=True)
class ChannelIndex:
    """Ordered channel ranges of a feature vector (timestep-major, blocks in forward order)."""

    ranges: tuple[ChannelRange, ...]

    @classmethod
    def build(
        cls,
        timesteps: Sequence[int],
        blocks: Sequence[str],
        channels: dict[str, int],
        ddpm_seg: dict[str, int] | None = None,
    ) -> ChannelIndex:
        """Ranges for every (timestep, block); ``ddpm_seg`` maps block names to DDPM-Seg numbers."""
        ranges, start = [], 0
        for t in timesteps:
            for b in blocks:
                ranges.append(ChannelRange(int(t), b, start, start + channels[b], (ddpm_seg or {}).get(b)))
                start += channels[b]
        return cls(tuple(ranges))

    @property
    def dim(self) -> int:
        return self.ranges[-1].stop if self.ranges else 0

    @property
    def timesteps(self) -> list[int]:
        return sorted({r.timestep for r in self.ranges})

    @property
    def blocks(self) -> list[str]:
        seen: list[str] = []
        for r in self.ranges:
            if r.block not in seen:
                seen.append(r.block)
        return seen

    def block_names(self, blocks: Sequence[str | int], numbering: str = "rsdiff") -> list[str]:
        """``blocks`` as this index's names: names pass; with ``numbering="ddpm_seg"`` an integer
        is DDPM-Seg's ``output_blocks`` number (a table extracted before rsdiff recorded those
        numbers cannot be addressed so).

        Raises:
            ConfigError: a number no extracted block has (the message lists the numbered blocks).
        """
        numbered = {r.ddpm_seg: r.block for r in self.ranges if r.ddpm_seg is not None}
        out = []
        for b in blocks:
            if numbering == "ddpm_seg" and (isinstance(b, int) or str(b).isdigit()):
                if int(b) not in numbered:
                    raise ConfigError(
                        f"DDPM-Seg block {b} is not in the extracted features; extracted blocks by number: "
                        f"{dict(sorted(numbered.items()))} "
                        f"(others: {[n for n in self.blocks if n not in numbered.values()]})"
                    )
                out.append(numbered[int(b)])
            else:
                out.append(str(b))
        return out

    def select(self, timesteps: Sequence[int], blocks: Sequence[str]) -> np.ndarray:
        """Channel positions of the (timestep, block) pairs chosen, in this index's order.

        Raises:
            ConfigError: a timestep or block not in the index (the message lists what exists).
        """
        missing_t = sorted(set(int(t) for t in timesteps) - set(self.timesteps))
        missing_b = [b for b in blocks if b not in self.blocks]
        if missing_t or missing_b:
            raise ConfigError(
                f"not in the extracted features: timesteps {missing_t} blocks {missing_b}; "
                f"extracted timesteps {self.timesteps}, blocks {self.blocks}"
            )
        if not timesteps or not blocks:
            raise ConfigError("select at least one timestep and one block")
        want = {(int(t), b) for t in timesteps for b in blocks}
        parts = [np.arange(r.start, r.stop) for r in self.ranges if (r.timestep, r.block) in want]
        return np.concatenate(parts)

    def to_json(self) -> list[dict]:
        return [asdict(r) for r in self.ranges]

    @classmethod
    def from_json(cls, data: list[dict]) -> ChannelIndex:
        return cls(tuple(ChannelRange(**r) for r in data))
