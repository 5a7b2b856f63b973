# The stand-in for python:3.11-slim where no image registry is reachable (`make images` builds it when its tag
# is missing): Debian bookworm made from Debian's own packages by mmdebstrap (the root filesystem tarball is this
# build's only context), with a venv of bookworm's Python 3.11 first on the PATH, so that `python` and `pip`
# mean in the images built on it what they mean in the official image.
FROM scratch
ADD rootfs.tar /
ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8
RUN python3.11 -m venv /opt/python
CMD ["python"]
