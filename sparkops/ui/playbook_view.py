"""What the Playbook page shows: the seed's common failures as live diagnoses.
"""

from __future__ import annotations

from sparkops.control import playbook
from sparkops.ui import data

TTL = data.READ_TTL_SECONDS


@data.cached()
def diagnoses(ctx: data.AppContext) -> list[playbook.Diagnosis]:
    """The playbook's live diagnoses (a dry run: nothing is changed)."""
    return playbook.diagnose(data.job_context(ctx))


def happening_badge(happening: bool | None) -> str:
    """Markdown for a diagnosis' "happening now": yes in red, no in green, not checked in grey."""
    if happening is None:
        return ":gray-badge[Happening now: not checked yet]"
    return ":red-badge[Happening now: yes]" if happening else ":green-badge[Happening now: no]"
