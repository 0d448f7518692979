"""Sweeps and their records: everything between the command layer and the engine that a job, or a sweep of
jobs, needs besides the merge itself. It reads typed settings (settings.py), never Hydra's config.

    settings.py   one job as the command line asks for it, typed
    preflight.py  every check of a job and of a sweep before a tensor is read, and the job's plan
    previews.py   sample images of a merged model (its family's diffusers pipeline), their settings, reading them back
    scores.py     scores of the sample images (CLIP, LAION's aesthetic head), the parents comparison, the objective
    records.py    what each job leaves in its folder, and reading a sweep folder back
    labels.py     what tells jobs apart: folder names and labels
    summary.py    the table of a sweep (rows, Markdown)
    summarize.py  writing every summary file; the end-of-sweep report
    plot.py       summary.png
    grid.py       grid.png, the previews' XY grid
    page.py       index.html
"""
