-- Argo CD health of a cvmp.io ConfidentialVM, from the kstatus conditions the
-- operator writes. Argo CD runs this in gopher-lua (Lua 5.1) with the object as `obj`.
-- Install: argocd-cm key resource.customizations.health.cvmp.io_ConfidentialVM
-- (docs/gitops.md). The order mirrors kstatus, so Argo CD and Flux agree.
local hs = {}

local function condition(status, ctype)
  if status.conditions == nil then
    return nil
  end
  for _, c in ipairs(status.conditions) do
    if c.type == ctype then
      return c
    end
  end
  return nil
end

-- "<reason>: <message>", or whichever of the two is there.
local function said(c)
  local reason = c.reason or ""
  local message = c.message or ""
  if reason ~= "" and message ~= "" then
    return reason .. ": " .. message
  end
  if reason ~= "" then
    return reason
  end
  return message
end

local meta = obj.metadata or {}
local status = obj.status
local name = meta.name or "<name>"

if meta.deletionTimestamp ~= nil then
  hs.status = "Progressing"
  hs.message = "being deleted: the node plugin stops the guest before the CVM goes"
  return hs
end

-- Conditions written for an older spec say nothing about the current one.
if status == nil or (meta.generation ~= nil and status.observedGeneration ~= meta.generation) then
  hs.status = "Progressing"
  hs.message = "waiting for the operator to observe generation " .. tostring(meta.generation or 1)
  return hs
end

local stalled = condition(status, "Stalled")
if stalled ~= nil and stalled.status == "True" then
  hs.status = "Degraded"
  hs.message = said(stalled)
  return hs
end

-- runStrategy Halted: stopped as asked.
if status.phase == "Stopped" then
  hs.status = "Suspended"
  hs.message = "stopped (runStrategy Halted)"
  return hs
end

local reconciling = condition(status, "Reconciling")
if reconciling ~= nil and reconciling.status == "True" then
  hs.status = "Progressing"
  hs.message = said(reconciling)
  return hs
end

local verified = condition(status, "Verified")
if verified ~= nil and verified.status == "True" then
  hs.status = "Healthy"
  hs.message = said(verified)
  return hs
end

-- SEV and SEV-ES evidence cannot be appraised by the operator; its work is done and
-- the owner checks the evidence with their own anchors.
if verified ~= nil and verified.status == "False" and verified.reason == "OwnerVerificationRequired" then
  hs.status = "Healthy"
  hs.message = "running; the owner must verify the evidence: kubectl cvm attest " .. name
  return hs
end

hs.status = "Progressing"
hs.message = "waiting for the operator's verdict (phase " .. tostring(status.phase or "unknown") .. ")"
return hs
