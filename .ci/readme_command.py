"""Print the command of one README section's first ```bash block, so CI runs exactly what a newcomer copies.

    python .ci/readme_command.py "Install and draw"
    python .ci/readme_command.py "Run the tests"
"""

import sys
from pathlib import Path

heading = "## " + sys.argv[1]
text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text(encoding="utf-8")
if heading not in text:
    sys.exit(f"README.md has no section '{heading}'")
section = text.split(heading, 1)[1]
block = section.split("```bash\n", 1)[1].split("```", 1)[0].strip()
print(block)
