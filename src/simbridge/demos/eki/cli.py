"""``simbridge demo eki``: run the coupled inversion with Rich progress, print the breakdown, plot it.

Mounted on the ``demo`` group by ``simbridge.cli``; this module only defines the command function.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from simbridge.demos.eki.driver import EkiResult, IterationStats, RunOptions, run_inversion
from simbridge.demos.eki.errors import EkiError
from simbridge.shm.errors import ShmError

# The command's defaults are RunOptions' own: one home for each (tests and benchmarks use RunOptions).
_DEFAULTS = RunOptions()
_TOLERANCE = _DEFAULTS.tolerance if _DEFAULTS.tolerance is not None else 0.0


def breakdown_table(result: EkiResult) -> Table:
    """The per-iteration breakdown, as the original coupling printed it, plus a mean row."""
    table = Table(
        title=f"EKI over simbridge Blocks, {result.ensemble.shape[1]} members (seconds; spread in g/s)"
    )
    # Short headers: the table must fit an 80-column terminal.
    for col in ("iter", "misfit", "spread", "EKI", "wait", "model", "comm", "total", "comm %"):
        table.add_column(col, justify="right")

    def row(label: str, s: list[IterationStats]) -> list[str]:
        def mean(attr: str) -> float:
            return float(sum(getattr(x, attr) for x in s)) / len(s)

        comm, total = mean("communication_s"), mean("total_s")
        # Misfit and spread describe one ensemble; their mean over iterations means nothing.
        single = len(s) == 1
        return [
            label,
            f"{s[0].misfit:.3f}" if single else "",
            f"{s[0].spread:.2f}" if single else "",
            f"{mean('eki_s'):.4f}",
            f"{mean('wait_s'):.4f}",
            f"{mean('forward_s'):.4f}",
            f"{comm:.4f}",
            f"{total:.4f}",
            f"{100 * comm / total if total else 0:.2f}",
        ]

    for s in result.history:
        table.add_row(*row(str(s.iteration), [s]))
    if result.history:
        table.add_section()
        table.add_row(*row("mean", result.history))
    return table


def eki_command(
    *,
    members: Annotated[
        int, typer.Option("--members", "-n", min=2, help="Ensemble size.")
    ] = _DEFAULTS.members,
    iterations: Annotated[
        int, typer.Option(min=0, help="EKI updates at most (one more forward run).")
    ] = _DEFAULTS.iterations,
    noise: Annotated[
        float, typer.Option(min=0.0, help="Relative observation noise (0.05 = 5 %).")
    ] = _DEFAULTS.noise,
    seed: Annotated[
        int, typer.Option(help="Seed of the noise, the prior and the perturbations.")
    ] = _DEFAULTS.seed,
    tolerance: Annotated[
        float, typer.Option(min=0.0, help="Stop once the misfit improves by less than this, twice.")
    ] = _TOLERANCE,
    output: Annotated[
        Path, typer.Option("--output", "-o", help="Directory for the plot, the model log and the results.")
    ] = _DEFAULTS.output_dir,
    record: Annotated[
        Path | None, typer.Option(help="Record every Block publish/read here (see `simbridge shm diff`).")
    ] = None,
    model: Annotated[
        Path | None, typer.Option(help="A prebuilt forward model; default: compile the packaged source.")
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Longest wait for any one message, seconds.")
    ] = _DEFAULTS.timeout_s,
    plot: Annotated[bool, typer.Option(help="Write eki.png (needs matplotlib).")] = True,
) -> None:
    """Ensemble Kalman inversion of a source's emissions, coupled to a C puff model over shared memory."""
    console = Console()
    options = RunOptions(
        members=members,
        iterations=iterations,
        noise=noise,
        seed=seed,
        tolerance=tolerance,
        output_dir=output,
        record=record,
        model=model,
        timeout_s=timeout,
    )
    progress = Progress(
        TextColumn("[bold]EKI[/bold]"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
    )
    try:
        with progress:
            task = progress.add_task("starting the forward model", total=iterations + 1)

            def advance(s: IterationStats) -> None:
                progress.update(
                    task,
                    advance=1,
                    description=f"misfit {s.misfit:.3f}, communication {s.communication_s * 1e3:.1f} ms "
                    f"({s.overhead_pct:.2f} %)",
                )

            result = run_inversion(options, on_iteration=advance)
            progress.update(task, total=len(result.history))
    except (EkiError, ShmError) as exc:
        # stderr, one line whatever the width: stdout stays the results.
        Console(stderr=True).print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(1) from exc
    console.print(breakdown_table(result))
    console.print(
        f"stopped: {result.stopped}. Relative error of the emission series: {result.relative_error:.2%} "
        f"(prior mean: {result.prior_relative_error:.2%}). Forward model: {result.model_status}; "
        f"log {result.log_path}"
    )
    console.print(f"results: {result.save(output)}")
    if plot:
        from simbridge.demos.eki.plot import plot_result

        try:
            console.print(f"plot: {plot_result(result, output / 'eki.png')}")
        except EkiError as exc:
            console.print(f"[yellow]{exc}[/yellow]")
