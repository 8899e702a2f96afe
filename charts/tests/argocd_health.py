#!/usr/bin/env python3
"""Runs Argo CD's health check for ApiPolicy (examples/gitops/argocd/health.lua) in a real
Lua interpreter (the PyPI package lupa), as Argo CD does: the object is the global `obj`.
Called by operator/tests/gitops.rs.

    argocd_health.py HEALTH_LUA OBJECT_JSON   -> {"status": ..., "message": ...}
"""
import json
import sys

try:
    from lupa import LuaRuntime
except ImportError:
    sys.stderr.write("argocd_health.py: the PyPI package lupa is not installed for %s "
                     "(./scripts/test installs it into target/helm-venv)\n" % sys.executable)
    sys.exit(3)

lua = LuaRuntime(unpack_returned_tuples=True)
script = open(sys.argv[1]).read()
obj = json.loads(sys.argv[2])
lua.globals().obj = lua.table_from(obj, recursive=True)
result = lua.execute(script)
print(json.dumps({"status": result["status"], "message": result["message"]}))
