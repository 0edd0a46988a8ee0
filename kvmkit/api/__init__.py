"""The control API: newline-delimited JSON over a Unix socket (mode 0600).

Each request is one JSON object with "cmd" and its arguments; each response is one
JSON object with "ok" and either the result fields or "error" (one line naming the
problem and the fix). The command handlers (`commands`) know nothing of the
transport (`server`, `client`), so a fuller API can reuse them.
"""
