from setuptools import find_packages, setup

setup(
    name="ebbcast",
    version="0.1.0",
    description="A Tornado WebSocket broadcast daemon that drains gracefully on SIGTERM",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    package_dir={"": "daemon"},
    packages=find_packages("daemon"),
    package_data={"ebbcast": ["static/*.html", "static/*.js", "py.typed"]},
    python_requires=">=3.10",
    install_requires=[
        # ebbcast.wire goes under Tornado's public API (and checks at start-up that
        # what it uses is there): keep Tornado to the minor versions CI tests, 6.5
        # (on Python 3.10) and 6.6.
        "tornado>=6.5,<6.7",
        "prometheus-client>=0.20",
        "httptools>=0.6",  # reads WebSocket handshakes on the fast path (ebbcast.handshake)
        "redis[hiredis]>=5.0",  # the redis:// backplane (asyncio client)
        # client tokens (auth.mode = "jwt"); "crypto" brings RS256 and ES256
        "PyJWT[crypto]>=2.8",
        'tomli>=2.0; python_version < "3.11"',
    ],
    extras_require={
        "test": [
            "pytest>=8,<10",
            "pytest-tornasync==0.6.0.post2",
            "websockets>=13",
            "trustme>=1.0",
            "hypothesis>=6.100",
            "tomli-w>=1.0",
            # browser tests drive Debian's Chromium (never a downloaded browser)
            "playwright>=1.65",
            "mypy>=1.10",
            # the upgrade test pip-installs a release into a folder, offline (a
            # Python 3.12+ venv has no setuptools of its own)
            "setuptools>=61",
            "wheel>=0.40",
            # the Kubernetes manifests, checked offline (brings PyYAML)
            "kubernetes-validate>=1.30",
            # builds deploy/grafana/ebbcast-dashboard.json (make dashboard)
            "grafanalib>=0.7",
            # the benchmark's peer that most users start from, FastAPI on uvicorn with
            # its standard extras (bench/servers/fastapi_manager.py), smoke-tested
            "fastapi>=0.110",
            "uvicorn[standard]>=0.29",
        ],
    },
    entry_points={"console_scripts": ["ebbcast = ebbcast.cli:main"]},
)
