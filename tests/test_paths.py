"""Tests for L{nextclaude.paths}."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import appdirs
from twisted.trial.unittest import SynchronousTestCase

from nextclaude import paths


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


class PermissiveUmaskTestCase(SynchronousTestCase):
    """Run each test with umask 0, so any mode we get right is our doing."""

    def setUp(self) -> None:
        previous = os.umask(0)
        self.addCleanup(os.umask, previous)


class ConfigFileTests(SynchronousTestCase):
    def test_precedence(self) -> None:
        """--config beats $NEXTCLAUDE_CONFIG, which beats appdirs' default."""
        default = (Path(appdirs.user_config_dir("nextclaude")) / "config.json").absolute()
        cases = [
            # (explicit, environment, expected)
            ("/a/explicit.json", {"NEXTCLAUDE_CONFIG": "/b/env.json"}, Path("/a/explicit.json")),
            ("/a/explicit.json", {}, Path("/a/explicit.json")),
            (None, {"NEXTCLAUDE_CONFIG": "/b/env.json"}, Path("/b/env.json")),
            (None, {}, default),
            # Empty values are how people unset things on a command line.
            ("", {"NEXTCLAUDE_CONFIG": "/b/env.json"}, Path("/b/env.json")),
            (None, {"NEXTCLAUDE_CONFIG": ""}, default),
        ]
        for explicit, environ, expected in cases:
            self.assertEqual(paths.config_file(explicit, environ), expected, (explicit, environ))

    def test_default_is_appdirs_config_json(self) -> None:
        """Without flag or variable the file is config.json in appdirs' user config dir for nextclaude."""
        self.assertEqual(
            paths.config_file(None, {}),
            (Path(appdirs.user_config_dir(paths.APP_NAME)) / "config.json").absolute(),
        )

    def test_environ_defaults_to_os_environ(self) -> None:
        """When no mapping is passed the real environment is consulted."""
        self.patch(os, "environ", {"NEXTCLAUDE_CONFIG": "/from/os/environ.json"})
        self.assertEqual(paths.config_file(None), Path("/from/os/environ.json"))

    def test_tilde_expanded(self) -> None:
        """A leading ~ in the flag or the variable means the home directory."""
        home = Path.home()
        self.assertEqual(paths.config_file("~/x.json", {}), home / "x.json")
        self.assertEqual(paths.config_file(None, {"NEXTCLAUDE_CONFIG": "~/y.json"}), home / "y.json")

    def test_relative_made_absolute(self) -> None:
        """A relative path is anchored at the current directory, so a later chdir does not move it."""
        self.assertEqual(paths.config_file("rel/c.json", {}), Path.cwd() / "rel" / "c.json")


class SiblingFileTests(SynchronousTestCase):
    def test_beside_config(self) -> None:
        """state.json and the lock file live in the config file's directory."""
        config = Path("/some/dir/config.json")
        self.assertEqual(paths.state_file(config), Path("/some/dir/state.json"))
        self.assertEqual(paths.lock_file(config), Path("/some/dir/nextclaude.lock"))


class SocketPathTests(PermissiveUmaskTestCase):
    def long_config(self) -> Path:
        """A config path whose directory is too long for a socket beside it."""
        return Path(self.mktemp()).absolute() / ("d" * 120) / "config.json"

    def test_override(self) -> None:
        """$NEXTCLAUDE_SOCKET wins, even over a short default."""
        result = paths.socket_path(Path("/c/config.json"), {"NEXTCLAUDE_SOCKET": "/run/x.sock"})
        self.assertEqual(result, Path("/run/x.sock"))

    def test_beside_config_when_short(self) -> None:
        """A short config directory gets control.sock beside the config."""
        self.assertEqual(
            paths.socket_path(Path("/c/config.json"), {}), Path("/c/control.sock")
        )

    def test_long_path_uses_runtime_dir(self) -> None:
        """Too long a path moves the socket to $XDG_RUNTIME_DIR under a hashed name."""
        # Only the name is computed; the directory is the session manager's to create.
        runtime = Path("/run/user/4242")
        result = paths.socket_path(self.long_config(), {"XDG_RUNTIME_DIR": str(runtime)})
        self.assertEqual(result.parent, runtime)
        self.assertRegex(result.name, r"^nextclaude-[0-9a-f]{16}\.sock$")

    def test_long_runtime_dir_falls_back_to_tmp(self) -> None:
        """A $XDG_RUNTIME_DIR too long itself is passed over for the private /tmp directory."""
        root = Path(self.mktemp())
        root.mkdir()
        environ = {"XDG_RUNTIME_DIR": "/" + "r" * 100}
        result = paths.socket_path(self.long_config(), environ, os.getuid(), tmp_root=root)
        self.assertEqual(result.parent, root / f"nextclaude-{os.getuid()}")

    def test_long_path_uses_private_tmp_dir(self) -> None:
        """Without $XDG_RUNTIME_DIR the socket goes in <tmp>/nextclaude-<uid>, created 0700."""
        root = Path(self.mktemp())
        root.mkdir()
        uid = os.getuid()
        result = paths.socket_path(self.long_config(), {}, uid, tmp_root=root)
        self.assertEqual(result.parent, root / f"nextclaude-{uid}")
        self.assertEqual(_mode(result.parent), 0o700)
        # And a second call accepts the directory it made.
        self.assertEqual(paths.socket_path(self.long_config(), {}, uid, tmp_root=root).parent, result.parent)

    def test_default_tmp_root_is_tmp(self) -> None:
        """The fallback lives in /tmp itself, not the possibly long $TMPDIR, and fits a socket address."""
        result = paths.socket_path(self.long_config(), {})
        self.assertEqual(result.parent, Path(f"/tmp/nextclaude-{os.getuid()}"))
        self.assertLess(len(os.fsencode(str(result))), 100)

    def test_name_depends_on_resolved_directory(self) -> None:
        """Every spelling of one config directory gives the same socket; other directories differ."""
        config = self.long_config()
        config.parent.mkdir(parents=True)
        link = Path(self.mktemp()).absolute()
        os.symlink(config.parent, link)
        environ = {"XDG_RUNTIME_DIR": "/run/user/1"}
        via_dotdot = config.parent / ".." / config.parent.name / "config.json"
        first = paths.socket_path(config, environ)
        self.assertEqual(paths.socket_path(via_dotdot, environ), first)
        self.assertEqual(paths.socket_path(link / "config.json", environ), first)
        other = config.parent.parent / ("e" * 120) / "config.json"
        self.assertNotEqual(paths.socket_path(other, environ), first)

    def test_refuses_unsafe_tmp_dir(self) -> None:
        """An existing fallback directory that is not ours alone is refused, naming the directory."""
        uid = os.getuid()

        def group_readable(directory: Path) -> None:
            directory.mkdir(0o750)

        def world_writable(directory: Path) -> None:
            directory.mkdir(0o777)

        def symlink(directory: Path) -> None:
            target = directory.parent / "elsewhere"
            target.mkdir(0o700)
            directory.symlink_to(target)

        def plain_file(directory: Path) -> None:
            directory.write_bytes(b"")

        for prepare in (group_readable, world_writable, symlink, plain_file):
            root = Path(self.mktemp())
            root.mkdir()
            directory = root / f"nextclaude-{uid}"
            prepare(directory)
            error = self.assertRaises(
                paths.UnsafeDirectoryError,
                paths.socket_path, self.long_config(), {}, uid, tmp_root=root,
            )
            self.assertEqual(error.path, directory, prepare.__name__)
            self.assertTrue(str(error).startswith(f"{directory}: "), prepare.__name__)

    def test_refuses_dir_owned_by_someone_else(self) -> None:
        """A fallback directory owned by another uid is refused even with mode 0700."""
        root = Path(self.mktemp())
        root.mkdir()
        other_uid = os.getuid() + 1
        # We can only create directories owned by ourselves, so ask on
        # behalf of another uid: the directory is then "someone else's".
        (root / f"nextclaude-{other_uid}").mkdir(0o700)
        error = self.assertRaises(
            paths.UnsafeDirectoryError,
            paths.socket_path, self.long_config(), {}, other_uid, tmp_root=root,
        )
        self.assertIn("owned by", error.problem)


class EnsurePrivateDirTests(PermissiveUmaskTestCase):
    def test_creates_nested_0700(self) -> None:
        """Every directory it creates is 0700 even with umask 0."""
        base = Path(self.mktemp())
        target = base / "a" / "b"
        paths.ensure_private_dir(target)
        for directory in (base, base / "a", target):
            self.assertEqual(_mode(directory), 0o700, directory)

    def test_existing_left_alone(self) -> None:
        """An existing directory keeps its mode, and calling again is harmless."""
        base = Path(self.mktemp())
        base.mkdir(0o755)
        paths.ensure_private_dir(base / "child")
        paths.ensure_private_dir(base / "child")
        self.assertEqual(_mode(base), 0o755)
        self.assertEqual(_mode(base / "child"), 0o700)
