"""A table of trainable vs total parameters per module, printed when fitting starts."""

from __future__ import annotations

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_only

from ..utils.param_count import ParamCount, count_parameters, parameter_rows

__all__ = ["ParameterSummary", "format_parameter_table"]


def format_parameter_table(rows: list[tuple[str, str, ParamCount]], total: ParamCount) -> str:
    """Plain-text table: module, type, trainable, total, % trainable, with a total row."""
    header = ("Module", "Type", "Trainable", "Total", "% trainable")
    body = [(n, t, f"{c.trainable:,}", f"{c.total:,}", f"{c.percent:.2f}") for n, t, c in rows]
    body.append(("TOTAL", "", f"{total.trainable:,}", f"{total.total:,}", f"{total.percent:.2f}"))
    widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)

    def fmt(r: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([fmt(header), line, *map(fmt, body[:-1]), line, fmt(body[-1])])


class ParameterSummary(pl.Callback):
    """Print trainable vs total parameters (count and %) per module at fit start.

    Runs in ``on_fit_start``, after every ``setup``-time freezing or injection, so the table shows
    what will really train. The numbers are kept in ``self.total`` and ``self.rows``.

    Args:
        depth: how many levels of submodules to list (1 = direct children of the LightningModule).
    """

    def __init__(self, depth: int = 2) -> None:
        self.depth = depth
        self.rows: list[tuple[str, str, ParamCount]] = []
        self.total: ParamCount | None = None

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.rows = parameter_rows(pl_module, self.depth)
        self.total = count_parameters(pl_module)
        self._print(format_parameter_table(self.rows, self.total))

    @rank_zero_only
    def _print(self, table: str) -> None:
        print("\nTrainable parameters\n" + table + "\n", flush=True)
