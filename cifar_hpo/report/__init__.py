"""``cifar-hpo report``: every final model against the baseline. Data first, then drawing, then the page.

- `data`: plain dicts and lists (also written to summary.json): finals, studies, curves, pruning checks.
- `figures`: one ``draw_*`` per PNG, from that data only.
- `page`: summary.md and the self-contained index.html.
"""
