"""`python -m services.ingress`: run the ingress service alone."""

import sys

from services.ingress.app import serve
from shared.config import settings_from_env
from shared.service import run_service

if __name__ == "__main__":
    sys.exit(run_service("ingress", serve, settings_from_env()))
