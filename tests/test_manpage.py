"""
The manual page, man/nextclaude.1, against the code it documents: every
subcommand and option of the argparse parser and of the twistd plugin,
every configuration field and its default, the console keys, the files and
the environment, all read from the code rather than listed here; and the
page itself must format without a warning.
"""

from __future__ import annotations

import argparse
import configparser
import dataclasses
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any, Iterator

from twisted.trial.unittest import SkipTest, SynchronousTestCase

from nextclaude import __version__, paths
from nextclaude.cli import build_parser, client_environment, console_log_path
from nextclaude.config import (
    DEFAULT_PRIORITY,
    AccountConfig,
    Config,
    ConfigError,
    ConsoleSettings,
    HistorySettings,
    NotifySettings,
    OAuthSettings,
    ProxySettings,
    new_config_data,
    parse_config,
)
from nextclaude.console import keymap
from nextclaude.requestlog import DEFAULT_MAX_BYTES
from nextclaude.tap import Options

TOP = Path(__file__).resolve().parent.parent
MANPAGE = TOP / "man" / "nextclaude.1"

# --- reading the page --------------------------------------------------------

# Macros whose arguments alternate between two fonts, joined without spaces.
_ALTERNATING = frozenset({"BR", "RB", "BI", "IB", "IR", "RI"})
# Macros whose arguments are text, joined with spaces.
_TEXT = frozenset({"B", "I", "SM", "SB", "SH", "SS", "SY"})
# Requests and macros that end a .TP item's body.
_ENDS_ITEM = frozenset({"TP", "PP", "LP", "P", "IP", "SH", "SS", "SY"})

_ESCAPES = [
    (re.compile(r"\\f(\[[^]]*\]|\(..|.)"), ""),  # font changes
    (re.compile(r"\\\((em|en)"), "-"),
    (re.compile(r"\\\(bu"), "*"),
    (re.compile(r"\\\(dq"), '"'),
    (re.compile(r"\\[&c%]"), ""),
    (re.compile(r"\\ "), " "),
    (re.compile(r"\\-"), "-"),
    (re.compile(r"\\e"), "\\\\"),
]


def unescape(text: str) -> str:
    """
    Plain text from troff text: font escapes and zero-width marks dropped,
    C{\\-} read as C{-}.
    """
    for pattern, replacement in _ESCAPES:
        text = pattern.sub(replacement, text)
    return text


def macro_arguments(text: str) -> list[str]:
    """
    Split a macro line's arguments as troff does: on spaces, with double
    quotes grouping (and C{""} inside quotes standing for one quote).
    """
    arguments: list[str] = []
    index = 0
    while index < len(text):
        if text[index] == " ":
            index += 1
            continue
        if text[index] == '"':
            index += 1
            current = []
            while index < len(text):
                if text.startswith('""', index):
                    current.append('"')
                    index += 2
                elif text[index] == '"':
                    index += 1
                    break
                else:
                    current.append(text[index])
                    index += 1
            arguments.append("".join(current))
        else:
            end = index
            while end < len(text) and not (text[end] == " " and text[end - 1] != "\\"):
                end += 1
            arguments.append(text[index:end])
            index = end
    return arguments


@dataclasses.dataclass
class Line:
    """
    One line of the page's text, with where it stands: its section, its
    subsection, the synopsis form (.SY) and the .TP item it belongs to.
    """

    text: str
    section: str | None
    subsection: str | None
    form: int | None
    item: int | None
    is_tag: bool


class ManPage:
    """
    The page parsed just enough to ask what a section, a subsection, a
    synopsis form or a list item says.
    """

    def __init__(self, source: str) -> None:
        self.title: list[str] = []
        self.lines: list[Line] = []
        self.tags: list[str] = []
        section = subsection = None
        form: int | None = None
        forms = 0
        item: int | None = None
        tag_next = False
        for raw in source.splitlines():
            if raw.startswith(('.\\"', "'\\\"")):
                continue
            name, text = None, raw
            if raw.startswith((".", "'")):
                name, _, rest = raw[1:].partition(" ")
                arguments = macro_arguments(rest)
                if name == "TH":
                    self.title = [unescape(argument) for argument in arguments]
                    continue
                if name in _ENDS_ITEM:
                    item = None
                if name == "SH":
                    section, subsection, form = unescape(" ".join(arguments)), None, None
                    continue
                if name == "SS":
                    subsection = unescape(" ".join(arguments))
                    continue
                if name == "SY":
                    form, forms = forms, forms + 1
                elif name == "YS":
                    form = None
                    continue
                if name == "TP":
                    tag_next = True
                    continue
                if name in _ALTERNATING:
                    text = "".join(arguments)
                elif name in _TEXT:
                    text = " ".join(arguments)
                else:
                    continue
            text = unescape(text)
            if tag_next:
                self.tags.append(text)
                item = len(self.tags) - 1
            self.lines.append(Line(text, section, subsection, form, item, tag_next))
            tag_next = False

    def sections(self) -> list[str]:
        return list(dict.fromkeys(line.section for line in self.lines if line.section))

    def subsections(self, section: str) -> list[str]:
        return list(
            dict.fromkeys(line.subsection for line in self.lines if line.section == section and line.subsection)
        )

    def text(self, section: str, subsection: str | None = None) -> str:
        """
        Everything C{section} (or one of its subsections) says, as one string.
        """
        return " ".join(
            line.text
            for line in self.lines
            if line.section == section and (subsection is None or line.subsection == subsection)
        )

    def item_tags(self, section: str, subsection: str | None = None) -> list[str]:
        """
        The tags of the .TP items of C{section} (or of one subsection).
        """
        return [
            line.text
            for line in self.lines
            if line.is_tag and line.section == section and (subsection is None or line.subsection == subsection)
        ]

    def items(self, section: str) -> dict[str, str]:
        """
        C{section}'s .TP items: tag -> body text.
        """
        bodies: dict[int, list[str]] = {}
        for line in self.lines:
            if line.section == section and line.item is not None and not line.is_tag:
                bodies.setdefault(line.item, []).append(line.text)
        return {
            self.tags[index]: " ".join(bodies.get(index, []))
            for index in sorted({line.item for line in self.lines if line.section == section and line.item is not None})
        }

    def forms(self) -> list[str]:
        """
        The synopsis forms (.SY ... .YS), each as one string.
        """
        grouped: dict[int, list[str]] = {}
        for line in self.lines:
            if line.form is not None:
                grouped.setdefault(line.form, []).append(line.text)
        return [" ".join(grouped[index]) for index in sorted(grouped)]


def mentions(text: str, word: str) -> bool:
    """
    Whether C{word} (an option such as C{--api}, a field, a key) stands in
    C{text} on its own: C{--api} is not found in C{--api-key-mode}.
    """
    return re.search(rf"(?<![\w\-.]){re.escape(word)}(?![\w\-])", text) is not None


def load_page() -> ManPage:
    return ManPage(MANPAGE.read_text(encoding="utf-8"))


# --- what the code says ---------------------------------------------------------


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("the parser has no subcommands")


def option_strings(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.Action, list[str]]]:
    """
    Each option of C{parser} but the help every parser has, with its
    strings (long and short).
    """
    for action in parser._actions:
        if action.option_strings and not isinstance(action, argparse._HelpAction):
            yield action, list(action.option_strings)


def positional_words(parser: argparse.ArgumentParser) -> list[str]:
    words: list[str] = []
    for action in parser._actions:
        if not action.option_strings and not isinstance(action, argparse._SubParsersAction):
            words.extend(str(action.metavar or action.dest).split())
    return words


def twistd_options() -> list[list[str]]:
    """
    The twistd plugin's options, each as its strings (long and short).
    """
    result = []
    entries: list[Any] = [*Options.optParameters, *Options.optFlags]
    for entry in entries:
        long, short = entry[0], entry[1]
        result.append([f"--{long}"] + ([f"-{short}"] if short else []))
    return result


def camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(part.title() for part in rest)


def top_level_fields() -> dict[str, Any]:
    """
    Every field of the file outside the accounts, by its dotted name in
    the file, with its default; read from the settings dataclasses.
    """
    fields: dict[str, Any] = {}
    sections = {
        "proxy": ProxySettings,
        "oauth": OAuthSettings,
        "history": HistorySettings,
        "console": ConsoleSettings,
        "notify": NotifySettings,
    }
    for field in dataclasses.fields(Config):
        if field.name == "path":
            continue
        if field.name in sections:
            for inner in dataclasses.fields(sections[field.name]):
                fields[f"{field.name}.{camel(inner.name)}"] = inner.default
        elif field.default_factory is not dataclasses.MISSING:
            fields[camel(field.name)] = field.default_factory()
        else:
            fields[camel(field.name)] = field.default
    return fields


def account_fields() -> list[str]:
    return [camel(field.name) for field in dataclasses.fields(AccountConfig)]


def parse_error(data: dict[str, Any]) -> str:
    try:
        parse_config(data, Path("/nonexistent/config.json"))
    except ConfigError as error:
        return str(error)
    return ""


def shown(value: Any) -> str:
    """
    A default as the page writes it.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


# --- the tests ------------------------------------------------------------------


class StructureTests(SynchronousTestCase):
    def test_sections(self) -> None:
        """
        The page has the sections a Unix user looks for, in the usual order,
        and its title names the version being documented.
        """
        page = load_page()
        expected = [
            "NAME",
            "SYNOPSIS",
            "DESCRIPTION",
            "GLOBAL OPTIONS",
            "COMMANDS",
            "CONSOLE KEYS",
            "FILES",
            "ENVIRONMENT",
            "CONFIGURATION",
            "EXIT STATUS",
            "EXAMPLES",
            "SEE ALSO",
        ]
        self.assertEqual(page.sections(), expected)
        self.assertEqual(page.title[:2], ["NEXTCLAUDE", "1"])
        self.assertEqual(page.title[3], f"NextClaude {__version__}")
        for reference in ("claude(1)", "twistd(1)"):
            self.assertIn(reference, page.text("SEE ALSO"))

    def test_installed_as_man1(self) -> None:
        """
        setup.cfg installs the page under share/man/man1, and the source
        distribution carries it.
        """
        setup = configparser.ConfigParser()
        setup.read(TOP / "setup.cfg")
        installed = setup.get("options.data_files", "share/man/man1").split()
        self.assertIn("man/nextclaude.1", installed)
        self.assertIn("recursive-include man *.1", (TOP / "MANIFEST.in").read_text())


class CommandTests(SynchronousTestCase):
    def test_every_subcommand_has_its_own_subsection(self) -> None:
        """
        COMMANDS has one subsection per subcommand of the parser, named
        "nextclaude COMMAND", and no subsection for a command that does not
        exist (the twistd plugin's apart).
        """
        page = load_page()
        documented = set(page.subsections("COMMANDS"))
        wanted = {f"nextclaude {name}" for name in subcommands(build_parser())}
        self.assertEqual(wanted - documented, set(), "subcommands without a subsection")
        self.assertEqual(documented - wanted, {"twistd nextclaude"}, "subsections of no subcommand")

    def test_every_option_in_its_commands_subsection(self) -> None:
        """
        Each subcommand's options, in their long and short forms, are items
        of that command's own subsection; its positional arguments are named
        there; and nothing there describes an option the command does not
        have.
        """
        page = load_page()
        for name, parser in subcommands(build_parser()).items():
            subsection = f"nextclaude {name}"
            tags = " ".join(page.item_tags("COMMANDS", subsection))
            text = page.text("COMMANDS", subsection)
            real: set[str] = set()
            for _, strings in option_strings(parser):
                real.update(strings)
                for string in strings:
                    self.assertTrue(mentions(tags, string), f"{string} is not an item of {subsection}")
            for word in positional_words(parser):
                self.assertTrue(mentions(text, word), f"{word} is not named in {subsection}")
            described = set(re.findall(r"(?<![\w\-])--?[a-z][\w\-]*", tags))
            self.assertEqual(described - real, set(), f"{subsection} describes options {name} does not have")

    def test_every_subcommand_in_the_synopsis(self) -> None:
        """
        SYNOPSIS has a form for each subcommand, which shows each of its
        options (in one of its spellings).
        """
        page = load_page()
        forms = {" ".join(form.split()[:2]): form for form in page.forms() if form.startswith("nextclaude ")}
        for name, parser in subcommands(build_parser()).items():
            form = forms.get(f"nextclaude {name}")
            self.assertIsNotNone(form, f"no synopsis form for nextclaude {name}")
            assert form is not None
            for _, strings in option_strings(parser):
                self.assertTrue(any(mentions(form, string) for string in strings), f"{strings} missing from: {form}")

    def test_global_options(self) -> None:
        """
        The options of the command itself (--config, --version, --help) are
        items of GLOBAL OPTIONS, and the synopsis shows them.
        """
        page = load_page()
        tags = " ".join(page.item_tags("GLOBAL OPTIONS"))
        synopsis = page.text("SYNOPSIS")
        parser = build_parser()
        strings = [string for action in parser._actions for string in action.option_strings]
        self.assertIn("--config", strings)
        for string in strings:
            self.assertTrue(mentions(tags, string), f"{string} is not an item of GLOBAL OPTIONS")
            self.assertTrue(mentions(synopsis, string), f"{string} is not in SYNOPSIS")

    def test_twistd_plugin_options(self) -> None:
        """
        Every optParameters and optFlags entry of the twistd plugin's
        Options, long and short, is an item of the "twistd nextclaude"
        subsection and in its synopsis form; nothing else is described
        there.
        """
        page = load_page()
        subsection = "twistd nextclaude"
        tags = " ".join(page.item_tags("COMMANDS", subsection))
        (form,) = [form for form in page.forms() if form.startswith("twistd ")]
        real: set[str] = set()
        for strings in twistd_options():
            real.update(strings)
            for string in strings:
                self.assertTrue(mentions(tags, string), f"{string} is not an item of {subsection}")
            self.assertTrue(any(mentions(form, string) for string in strings), f"{strings} missing from: {form}")
        described = set(re.findall(r"(?<![\w\-])--?[a-z][\w\-]*", tags))
        self.assertEqual(described - real, set())


class ConfigurationTests(SynchronousTestCase):
    def test_fields_come_from_the_parser(self) -> None:
        """
        The field names this module derives from the settings dataclasses
        are the ones parse_config reads: a wrong value in each is reported
        under that name.  (Otherwise the next test would check the wrong
        names.)
        """
        account = {"name": "a", "type": "oauth", "accessToken": "token"}
        for field in top_level_fields():
            section, _, key = field.rpartition(".")
            data: dict[str, Any] = {section: {key: {}}} if section else {key: {}}
            self.assertTrue(mentions(parse_error(data), field), f"parse_config does not read {field}")
        for field in account_fields():
            error = parse_error({"accounts": [{**account, field: {}}]})
            self.assertIn(f"accounts[0].{field} ", error)
        # What a first run writes is among them too.
        written: set[str] = set()
        for key, value in new_config_data().items():
            if isinstance(value, dict):
                written.update(f"{key}.{inner}" for inner in value)
            else:
                written.add(key)
        self.assertEqual(written - set(top_level_fields()), set())

    def test_every_field_with_its_default(self) -> None:
        """
        CONFIGURATION has an item for every field of the file and of an
        account; each field with a fixed default states it
        ("Default: 3456."), and the priority default is given per type.
        """
        page = load_page()
        items = page.items("CONFIGURATION")
        for field, default in top_level_fields().items():
            self.assertIn(field, items, f"{field} is not an item of CONFIGURATION")
            if default not in (None, "", ()):
                self.assertIn(f"Default: {shown(default)}", items[field], field)
        for field in account_fields():
            self.assertIn(field, items, f"account field {field} is not an item of CONFIGURATION")
        for kind, priority in DEFAULT_PRIORITY.items():
            self.assertIn(f"{priority} for {kind}", items["priority"])
        self.assertIn("milliseconds", items["expiresAt"])


class ConsoleKeysTests(SynchronousTestCase):
    def test_dashboard_keys(self) -> None:
        """
        Every key of the console's dashboard is an item of CONSOLE KEYS,
        with its case (r removes, R reloads).
        """
        page = load_page()
        tags = {key for tag in page.item_tags("CONSOLE KEYS") for key in tag.split(", ")}
        for key in keymap.DASHBOARD:
            self.assertIn(key, tags)

    def test_menu_dialog_and_form_keys(self) -> None:
        """
        Every key the console's menus, yes/no questions and add form take is
        named in CONSOLE KEYS (urwid's "shift tab" written Shift+Tab).
        """
        page = load_page()
        text = page.text("CONSOLE KEYS").lower().replace("+", " ")
        for table in (keymap.MENU, keymap.CONFIRM_DIALOG, keymap.FORM):
            for key in table:
                self.assertTrue(mentions(text, key.lower()), f"console key {key!r} is not in CONSOLE KEYS")


class FilesAndEnvironmentTests(SynchronousTestCase):
    def test_files(self) -> None:
        """
        FILES has an item for each file NextClaude keeps, named as the code
        names it: the config file, state, lock, control socket, the
        console's log, the request log and bodies, Claude Code's
        credentials.
        """
        page = load_page()
        tags = page.item_tags("FILES")
        config = paths.config_file(None, environ={})
        directory = Path("/c")
        names = [
            config.name,
            paths.state_file(directory / config.name).name,
            paths.lock_file(directory / config.name).name,
            paths.socket_path(directory / config.name, environ={}).name,
            console_log_path(directory / config.name).name,
            "requests-YYYY-MM-DD.jsonl",
            "bodies/",
            ".credentials.json",
        ]
        for name in names:
            self.assertTrue(any(name in tag for tag in tags), f"{name} is not an item of FILES")
        files = page.text("FILES")
        self.assertIn(f"{DEFAULT_MAX_BYTES // 2**20} MiB", files)
        self.assertIn("requests-YYYY-MM-DD.N.jsonl", files)
        self.assertIn("/tmp/nextclaude-UID/", files)

    def test_environment(self) -> None:
        """
        ENVIRONMENT has an item for each variable NextClaude reads, and for
        each one `env` and `run` set, in both key modes.
        """
        self.patch(os, "environ", {k: v for k, v in os.environ.items() if k != paths.SOCKET_ENV})
        page = load_page()
        tags = page.item_tags("ENVIRONMENT")
        config = Config(path=Path(self.mktemp()).absolute() / "config.json", proxy=ProxySettings(api_key="nc-test"))
        set_by_us = set(client_environment(config, False)) | set(client_environment(config, True))
        read = {paths.CONFIG_ENV, paths.SOCKET_ENV, "XDG_RUNTIME_DIR", "CLAUDE_CONFIG_DIR"}
        for name in sorted(set_by_us | read):
            self.assertIn(name, tags)

    def test_exit_statuses(self) -> None:
        """
        EXIT STATUS lists the statuses the command uses: 0, 1, 2 (usage),
        127 (run without claude) and 128+N (a second signal).
        """
        page = load_page()
        self.assertEqual(page.item_tags("EXIT STATUS"), ["0", "1", "2", "127", "128+N"])


class FormattingTests(SynchronousTestCase):
    def lint(self, argv: list[str], required_in_ci: bool) -> None:
        tool = shutil.which(argv[0])
        if tool is None:
            message = f"{argv[0]} is not installed"
            if required_in_ci and os.environ.get("CI") == "true":
                self.fail(f"{message}; under CI=true it must be (.ci/run installs groff-base)")
            raise SkipTest(message)
        result = subprocess.run([tool, *argv[1:], str(MANPAGE)], capture_output=True, text=True)
        self.assertEqual(result.stdout + result.stderr, "")
        self.assertEqual(result.returncode, 0)

    def test_groff_warns_of_nothing(self) -> None:
        """
        `groff -man -ww -z` formats the page without a single warning.
        Skipped where groff is missing, except under CI=true, where it
        fails instead.
        """
        self.lint(["groff", "-man", "-ww", "-z"], required_in_ci=True)

    def test_mandoc_lint_is_clean(self) -> None:
        """
        `mandoc -Tlint` finds nothing to report, style included.  An extra
        check: skipped wherever mandoc is missing (CI installs groff only).
        """
        self.lint(["mandoc", "-Tlint"], required_in_ci=False)

    def test_parser_reads_the_troff(self) -> None:
        """
        The page reader used above unescapes hyphens and fonts, splits
        quoted macro arguments, joins alternating-font arguments, and files
        lines under their section, subsection and item.
        """
        page = ManPage(
            '.TH X 1 2020-01-01 "X 1"\n.SH "GLOBAL OPTIONS"\n.SS "x y"\n.TP\n'
            '.BR \\-p " \\fIPORT\\fR, " \\-\\-port\nBody \\(em text.\n.PP\nAfter.\n'
        )
        self.assertEqual(page.title, ["X", "1", "2020-01-01", "X 1"])
        self.assertEqual(page.item_tags("GLOBAL OPTIONS", "x y"), ["-p PORT, --port"])
        self.assertEqual(page.items("GLOBAL OPTIONS"), {"-p PORT, --port": "Body - text."})
        self.assertEqual(page.text("GLOBAL OPTIONS"), "-p PORT, --port Body - text. After.")
        self.assertTrue(mentions("--api-key-mode and --api", "--api"))
        self.assertFalse(mentions("--api-key-mode", "--api"))
