"""`dpolab <stage>`: each command parses options and calls one library function. Every command fails the same way
(`cli._base.guarded`): one line naming the file or option at fault, exit 1 (2 for usage errors), no traceback
unless DPOLAB_DEBUG=1."""

from __future__ import annotations

from dpolab.cli import _base, data, evaluate, model, publish, sweep, train, webapp

app = _base.Typer(help="dpolab: align small causal LMs with human preferences by DPO, end to end.",
                  no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)
app.add_typer(data.data_app, name="data")
app.add_typer(model.model_app, name="model")
app.command("train")(train.train)
app.command("eval")(evaluate.evaluate)
app.command("sweep")(sweep.sweep)
app.command("export")(publish.export)
app.command("push")(publish.push)
app.command("app")(webapp.app_command)


def main() -> None:
    _base.setup_logging()
    app()


if __name__ == "__main__":
    main()
