"""Governance insight: ITIL change KPIs, release and deployment figures and DORA's four
keys, computed from the CMS alone (no extra data entry), with plots and a static dashboard.

    records.py    read the CMS (read-only) into plain rows             (Act, read-only)
    figure.py     a figure: its value and how it was computed          (Decide)
    kpis.py       ITIL change KPIs, release and deployment figures     (Decide)
    dora.py       DORA's four keys                                      (Decide)
    review.py     one change's own figures, for its post-implementation review (Decide)
    plots.py      deployment timeline and KPI trends as PNG (matplotlib, Agg, lazy)
    dashboard.py  the static HTML page: environments × releases, deployments, RFCs

Every computation takes plain rows (dicts) and a period, so it is tested as data.
"""
