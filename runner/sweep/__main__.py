"""``python -m runner.sweep {status,resume,retry-failed,cancel,report} <sweep dir>``.

Exit codes: 0 done, 1 the command failed (one line says why), 2 the directory is not a sweep.
"""

from __future__ import annotations

import argparse
import sys

from runner.sweep import commands, ledger


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m runner.sweep", description="Follow and act on a sweep's members.")
    sub = p.add_subparsers(dest="command", required=True)
    status = sub.add_parser("status", help="a table: member, state, step/total, objective, elapsed, job id")
    status.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS")
    status.add_argument("--json", action="store_true", help="every member's record, for scripts")
    for name, text in (
        ("resume", "resubmit every member that is not complete (each from its own checkpoint)"),
        ("retry-failed", "resubmit the members that failed, were cancelled or timed out"),
    ):
        c = sub.add_parser(name, help=text)
        c.add_argument("--dry-run", action="store_true", help="print the command instead of running it")
    sub.add_parser("cancel", help="scancel every member job that is still pending or running")
    sub.add_parser("report", help="ranked table; writes report.png and report.md in the sweep directory")
    for c in sub.choices.values():
        c.add_argument("sweep_dir")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    try:
        if args.command == "status" and args.watch is not None:
            return commands.watch(args.sweep_dir, args.watch)
        records = commands.load(args.sweep_dir)
        if args.command == "status":
            print(commands.status_json(records) if args.json else commands.status_text(args.sweep_dir, records))
            return 0
        if args.command == "report":
            from runner.sweep.report import report

            text, written = report(args.sweep_dir, records)
            print(text)
            best = written["best"]
            if best is not None and best.objective is not None:
                print(f"best: #{best.index} {commands.member_label(best)} ({best.objective:.4f})")
            if written["png"] is None:
                print("report.png not written: matplotlib is missing (pip install 'runner[report]')")
            else:
                print(f"wrote {written['png']} and {written['md']}")
            return 0
        if args.command == "cancel":
            return commands.cancel(args.sweep_dir, records)
        from runner.__main__ import CONFIG_DIR

        if args.command == "resume":
            todo = [r for r in records if r.state != ledger.COMPLETED]
            if not todo:
                print(f"resume: all {len(records)} members of {args.sweep_dir} are complete; nothing submitted")
                return 0
            alive = [r for r in todo if not r.terminal]
            if alive:
                raise commands.SweepError(
                    f"resume: {len(alive)} member(s) still pending or running (#"
                    + ", #".join(str(r.index) for r in alive)
                    + "); wait for them, or `cancel` first"
                )
            return commands.resubmit(args.sweep_dir, todo, "resume", CONFIG_DIR, args.dry_run)
        failed = [r for r in records if r.terminal and r.state != ledger.COMPLETED]
        return commands.resubmit(args.sweep_dir, failed, "retry-failed", CONFIG_DIR, args.dry_run)
    except ledger.NotASweep as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except commands.SweepError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
