"""The evaluation's summary as markdown (summary.md); `runner.evaluate` writes it beside summary.json."""

from __future__ import annotations

from diffusion_jax.evaluation import quality


def summary_markdown(summary: dict) -> str:
    """The markdown of summary.md: likelihood, the sample-quality table, pictures, timings."""
    lines = [f"# Evaluation of {summary['workdir']}", ""]
    if "checkpoint_step" in summary:
        lines += [f"Checkpoint step: {summary['checkpoint_step']}", ""]
    if "bpd" in summary:
        b = summary["bpd"]
        if "num_steps" in b:  # the probability-flow ODE
            what = (f"Test NLL: **{b['total_bpd']:.4f} +- {b['total_bpd_stderr']:.4f} bits/dim**; "
                    f"{b['num_images']} test images, {b['estimator']} (sigma {b['sigma_lo']:g} to "
                    f"{b['sigma_hi']:g}, {b['calls_per_image']} network calls with VJPs per image), "
                    f"{b['condition']}; {b['seconds']:.0f}s.")
        else:
            what = (f"Test NLL bound: **{b['total_bpd']:.4f} +- {b['total_bpd_stderr']:.4f} bits/dim** "
                    f"(prior {b['prior_bpd']:.4f}, KL terms {b['vb_bpd']:.4f}, decoder {b['decoder_bpd']:.4f}); "
                    f"{b['num_images']} test images, {b['estimator']}, {b['condition']}, "
                    f"variance {b['variance']}; {b['seconds']:.0f}s.")
        lines += ["## Likelihood", "", what, ""]
    if "quality" in summary:
        c = summary["classifier"]
        lines += ["## Sample quality", "",
                  f"Features: penultimate layer of the evaluation classifier "
                  f"({c['dataset']} test accuracy {100 * c['test_accuracy']:.2f}%). "
                  f"{summary['settings']['num_samples']} samples per row; KID shown x1e3.", "",
                  quality.markdown_table(summary["quality"], summary["floor"])]
    if "pictures" in summary:
        lines += ["## Pictures", ""]
        lines += [f"- {k}: {v}" for k, v in summary["pictures"].items()]
        lines.append("")
    lines += ["## Timings (s)", "", ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()), ""]
    return "\n".join(lines)
