"""The scaling report's plots (bench/report.py): speedup against ranks with the ideal line,
and one step's time split into compute, pipeline bubble, exposed communication and other.
matplotlib is an optional, benchmark-only dependency: draw() raises ImportError without it."""
import os

SEGMENTS = (("compute_ms", "compute (ideal share)", "tab:blue"),
            ("bubble_ms", "pipeline bubble (simulated)", "tab:gray"),
            ("exposed_comm_ms", "exposed comm", "tab:orange"),
            ("other_ms", "other (contention, smaller GEMMs)", "tab:olive"))


def draw(out_dir, model, tables, cores):
    """tables: {"strong"|"weak": [measured cases]}; returns the paths of the PNGs written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    paths = [os.path.join(out_dir, f"speedup_{model}.png"),
             os.path.join(out_dir, f"step_time_{model}.png")]
    for path, plot in zip(paths, (plot_speedup, plot_step_time)):
        fig, axes = plt.subplots(1, len(tables), figsize=(6.5 * len(tables), 4.8),
                                 squeeze=False)
        for ax, (kind, cases) in zip(axes[0], tables.items()):
            plot(ax, cases, cores)
            ax.set_title(f"{model}: {kind} scaling")
        fig.tight_layout()
        fig.savefig(path + ".tmp.png", dpi=110)
        plt.close(fig)
        os.replace(path + ".tmp.png", path)
    return paths


def plot_speedup(ax, cases, cores):
    """A line per mode from the 1-rank baseline; hollow markers where ranks > cores."""
    ranks = sorted({c.ranks for c in cases} | {1})
    ax.plot(ranks, ranks, "k--", linewidth=1, label="ideal")
    if ranks[-1] > cores:
        ax.axvspan(cores + 0.5, ranks[-1] + 0.5, color="0.92", label="oversubscribed")
    for mode in dict.fromkeys(c.mode for c in cases if c.mode != "single"):
        points = [(1, 1.0)] + [(c.ranks, c.row["speedup"]) for c in cases if c.mode == mode]
        line, = ax.plot(*zip(*points), marker="o", linewidth=1.2, label=mode)
        hollow = [(r, s) for r, s in points if r > cores]
        if hollow:
            ax.plot(*zip(*hollow), "o", color="white", markeredgecolor=line.get_color(),
                    markersize=6)
    ax.set_xticks(ranks)
    ax.set_xlim(0.5, ranks[-1] + 0.5)
    ax.set_xlabel("ranks")
    ax.set_ylabel("speedup (tok/s over the 1-rank run)")
    ax.legend(fontsize=7, loc="upper left")


def plot_step_time(ax, cases, cores):
    """Stacked bars, one per row; a hatched exposed-comm segment is a residual estimate."""
    labels = [f"{c.mode}\n{c.ranks}{'*' if c.ranks > cores else ''}" for c in cases]
    bottom = [0.0] * len(cases)
    for key, name, colour in SEGMENTS:
        heights = [c.row[key] for c in cases]
        bars = ax.bar(range(len(cases)), heights, bottom=bottom, color=colour, label=name)
        if key == "exposed_comm_ms":
            for bar, case in zip(bars, cases):
                if case.row["exposed_comm_source"] == "residual":
                    bar.set_hatch("//")
        bottom = [b + h for b, h in zip(bottom, heights)]
    ax.set_xticks(range(len(cases)), labels, fontsize=7)
    ax.set_ylim(0, 1.35 * max(bottom, default=1.0))  # room for the legend above the bars
    ax.set_ylabel("ms per step")
    ax.set_xlabel("mode, ranks (* oversubscribed); hatched: not timed, the rest of the step")
    ax.legend(fontsize=7, loc="upper left")
