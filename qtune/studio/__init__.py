"""`qtune studio`: a browser page to run, watch, compare and ship adapters (docs/studio.md).

    common.py      the Studio, the API error, path and name checks, child processes and their logs
    app.py         the Starlette app: security (loopback, token, Host/Origin), the page, the routes below
    runs.py        runs under the output folder: state, live progress, start / stop / resume (`qtune train`)
    adapters.py    finished adapters: details, delete, export jobs, push preview
    playground.py  one base and its adapters in an AdapterPool, answering through qtune serve's routes
    plan.py        the memory planner (qtune plan) for the page
    static/        the page: index.html, studio.js, studio.css (no build step, nothing fetched)
"""
