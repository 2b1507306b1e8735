"""`qtune studio`: a browser page to run, watch, compare and ship adapters (docs/studio.md).

common.py      the Studio, the API error, path and name checks, child processes and their logs
app.py         the Starlette app: security (token, Host/Origin, JSON only), the page, the routes below
configs.py     the configs a run starts from, the form's keys, and the checks on what the form sends
runs.py        runs under the output folder: state, start / stop / resume (`qtune train`), forget
records.py     what a run leaves on disk (the studio's records, progress.jsonl, qtune.json), and its process
adapters.py    finished adapters: details, delete
jobs.py        export jobs (`qtune export`) and the push preview (`qtune push --dry-run`)
playground.py  one base and its adapters in an AdapterPool, answering through qtune serve's routes
plan.py        the memory planner (qtune plan) for the page
static/        the page: index.html, one script per screen, studio.css (no build step, nothing fetched)
"""
