"""What the CLI tests share: running `rlhf-ray` in this process."""

from __future__ import annotations

from rlhf_ray.cli import main as cli


def run(argv, capsys):
    """(exit code, stdout, stderr) of `rlhf-ray <argv>` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err
