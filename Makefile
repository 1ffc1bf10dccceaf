# leankv: `make` builds ./leankv, `make test` sets up and runs every CPU test.
#
# CUDA=1 (default when nvcc is on PATH) adds the GPU side (leankv.cu); CUDA=0 forces a
# CPU-only build.

CC      ?= gcc
CFLAGS  ?= -O3 -march=native -std=gnu11 -Wall -Wextra -Wno-unused-parameter
OMP     ?= -fopenmp
LDLIBS  += -lm
PYTHON  ?= .venv/bin/python
SAN     = -O1 -g -std=gnu11 -fsanitize=address,undefined -fno-omit-frame-pointer \
          -fno-sanitize-recover=undefined

SRC = leankv.c tokenizer.c
HDR = leankv.h

.PHONY: all test test-setup clean

all: leankv

leankv: $(SRC) $(HDR)
	$(CC) $(CFLAGS) $(OMP) -o $@ $(SRC) $(LDLIBS)

# the same program built with AddressSanitizer and UndefinedBehaviorSanitizer, for the
# bad-input tests
leankv-asan: $(SRC) $(HDR)
	$(CC) $(SAN) -o $@ $(SRC) $(LDLIBS)

# installs what the tests need (Debian packages, .venv, the default model), then runs them
test: test-setup leankv leankv-asan
	$(PYTHON) -m pytest -q tests

test-setup:
	./run.sh --setup

clean:
	rm -f leankv leankv-asan *.o
