"""The frame every headwatch dashboard shares: UID, tags, time, refresh, datasource, links."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard as db
from grafana_foundation_sdk.models import dashboard as dm

from dashboards.config import GenerateConfig
from dashboards.panels import DATASOURCE, datasource_variable

TAG = "headwatch"


def base_dashboard(uid: str, title: str, config: GenerateConfig) -> db.Dashboard:
    """Return a dashboard with a fixed UID, the datasource variable and links to its siblings."""
    return (
        db.Dashboard(title)
        .uid(uid)
        .tags([TAG])
        .editable()
        .timezone("browser")
        .time("now-6h", "now")
        .refresh(config.dashboards.refresh)
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .with_variable(datasource_variable())
        .annotation(
            # Firing headwatch alerts as annotations, so a panel shows when a page went out.
            db.AnnotationQuery()
            .name("headwatch alerts")
            .datasource(DATASOURCE)
            .enable(True)
            .icon_color("red")
            .expr('ALERTS{team="headwatch", alertstate="firing"}')
        )
        .link(
            db.DashboardLink("headwatch")
            .type(dm.DashboardLinkType.DASHBOARDS)
            .tags([TAG])
            .as_dropdown(True)
            .include_vars(True)
            .keep_time(True)
        )
    )
