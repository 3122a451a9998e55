"""MkDocs hook: the command-line reference written from the CLI itself, so it cannot drift from `lepton --help`.

A page holding the line ``<!-- lepton-cli-reference -->`` gets, in its place, one section per command and
sub-command: the usage line, the help text and a table of the arguments and options (type, default, environment
variable). It reads ``lepton.cli``'s Typer app, which loads without PyTorch.
"""

from __future__ import annotations

import html
import warnings
from typing import Any

MARKER = "<!-- lepton-cli-reference -->"


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, cli_reference())


def cli_reference() -> str:
    import click

    with warnings.catch_warnings():  # typer's own imports of deprecated click helpers are not ours to fix
        warnings.simplefilter("ignore", DeprecationWarning)
        import typer

        from lepton.cli import app

    root = typer.main.get_command(app)
    ctx = click.Context(root, info_name="lepton")
    return "\n".join(_command(root, ctx, top=True))


def _cell(text: Any) -> str:
    """Table-cell text: one line, no raw HTML, pipes escaped."""
    return html.escape(" ".join(str(text).split()), quote=False).replace("|", "\\|")


def _command(cmd: Any, ctx: Any, top: bool = False) -> list[str]:
    import click

    path = ctx.command_path
    lines = [] if top else [f"{'#' * len(path.split())} `{path}`", ""]  # lepton serve: ##, lepton models list: ###
    if cmd.help and not top:
        lines += [_cell(cmd.help).replace("\\|", "|"), ""]
    lines += ["```text", f"{path} {' '.join(cmd.collect_usage_pieces(ctx))}", "```", ""]
    params = [p for p in cmd.params if not getattr(p, "hidden", False)]
    if params:
        lines += ["| argument or option | type | default | what it does |", "|---|---|---|---|"]
        for param in params:
            lines.append(_param_row(param))
        lines.append("")
    if isinstance(cmd, click.Group):
        names = [n for n in cmd.list_commands(ctx) if not cmd.get_command(ctx, n).hidden]
        if top:
            lines += ["| command | what it does |", "|---|---|"]
            for name in names:
                sub = cmd.get_command(ctx, name)
                lines.append(f"| [`{name}`](#{_slug(f'lepton {name}')}) | {_cell(sub.get_short_help_str(200))} |")
            lines.append("")
        for name in names:
            sub = cmd.get_command(ctx, name)
            lines += _command(sub, click.Context(sub, info_name=name, parent=ctx))
    return lines


def _param_row(param: Any) -> str:
    import click

    if isinstance(param, click.Argument):
        name = f"`{param.name.upper()}`" + ("" if param.required else " (optional)")
        if param.nargs == -1:
            name += " …"
    else:
        name = ", ".join(f"`{o}`" for o in param.opts)
        if param.secondary_opts:
            name += " / " + ", ".join(f"`{o}`" for o in param.secondary_opts)
        if param.required:
            name += " (required)"
    flag = getattr(param, "is_flag", False)
    kind = "flag" if flag else param.type.name.lower()
    if getattr(param, "multiple", False):
        kind += ", repeatable"
    default = param.default
    shown = ""
    if default not in (None, (), [], "") and not (flag and default is False and not param.secondary_opts):
        if flag and param.secondary_opts:
            shown = f"`{param.opts[0] if default else param.secondary_opts[0]}`"
        else:
            shown = f"`{default}`"
    help_text = getattr(param, "help", None) or ""
    if getattr(param, "envvar", None):
        help_text += f" Environment variable: `{param.envvar}`."
    return f"| {name} | {kind} | {shown} | {_cell(help_text)} |"


def _slug(text: str) -> str:
    """The anchor MkDocs' table of contents gives a heading like ``lepton data inspect``."""
    return "-".join(text.lower().split())
