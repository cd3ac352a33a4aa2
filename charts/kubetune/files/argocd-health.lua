-- Argo CD health check for kubetune.io/FineTuneJob.
-- Install: argocd-cm key `resource.customizations.health.kubetune.io_FineTuneJob`
-- (see examples/gitops/argocd-cm.yaml). A ten-hour run is Progressing, not Degraded.
local hs = {}
local status = obj.status
local generation = obj.metadata and obj.metadata.generation

local function condition(kind)
  if status == nil or status.conditions == nil then return nil end
  for _, c in ipairs(status.conditions) do
    if c.type == kind then return c end
  end
  return nil
end

if status == nil or status.observedGeneration == nil
    or (generation ~= nil and status.observedGeneration < generation) then
  hs.status = "Unknown"
  hs.message = "waiting for the kubetune operator to observe generation " .. tostring(generation)
  return hs
end

local ready = condition("Ready")
local why = ""
if ready ~= nil and ready.message ~= nil and ready.message ~= "" then
  why = ": " .. ready.message
end
local phase = status.phase

if phase == "Succeeded" then
  hs.status = "Healthy"
  hs.message = "training finished"
elseif phase == "Failed" then
  local stalled = condition("Stalled")
  hs.status = "Degraded"
  if stalled ~= nil then
    hs.message = (stalled.reason or "Failed") .. ": " .. (stalled.message or "")
  else
    hs.message = "training failed" .. why
  end
elseif condition("Stalled") ~= nil and condition("Stalled").status == "True" then
  -- Not failed, but stuck until a person acts (e.g. an add-on that is not installed).
  local stalled = condition("Stalled")
  hs.status = "Degraded"
  hs.message = (stalled.reason or "Stalled") .. ": " .. (stalled.message or "")
elseif phase == "Suspended" then
  hs.status = "Suspended"
  hs.message = "suspended" .. why
elseif phase == "Pending" or phase == "Validating" or phase == "Queued"
    or phase == "Running" then
  hs.status = "Progressing"
  local progress = status.progress
  if phase == "Running" and progress ~= nil and progress.percent ~= nil then
    hs.message = "training " .. tostring(progress.percent) .. "%"
  else
    hs.message = string.lower(phase) .. why
  end
else
  hs.status = "Unknown"
  hs.message = "unknown phase " .. tostring(phase)
end
return hs
