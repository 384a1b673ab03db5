# The launcher image: the static `cvm-launcher`, run as a non-root user in each CVM's
# launcher pod (no privilege, no hostPath; kubelet's device plugin hands it the devices).
# Built by e2e/tools/images.sh like the others.
FROM scratch
COPY cvm-launcher /usr/local/bin/cvm-launcher
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cvm-launcher"]
