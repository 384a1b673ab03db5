# The launcher image: the static `cvm-launcher` and Debian's QEMU (the binary, the
# libraries it links and the firmware a direct-kernel boot reads), run as a non-root user
# in each CVM's launcher pod (no privilege, no hostPath; kubelet's device plugin hands it
# the devices). Built by e2e/tools/images.sh from a staged root: nothing is pulled.
FROM scratch
COPY root/ /
ENV PATH=/usr/local/bin:/usr/bin
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/cvm-launcher"]
