"""
The live console: an urwid dashboard attached to a running proxy over its
control socket (PRODUCT.md, "The dashboard (console) and nextclaude status").

Entry point: L{nextclaude.console.app.run_console}.  Modules: C{views}
(pure formatting of the snapshot and events), C{widgets} (urwid widgets and
the layout), C{keymap} (key → action tables), C{palette} (named
attributes), C{app} (behaviour, timers, the terminal).
"""
